//! REST verbs on resources: request decoding, response encoding (JSON or
//! server-side printed Tables), and the registry call in between.

use std::sync::Arc;

use base64::Engine;
use bytes::{BufMut, BytesMut};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Request, Response};
use serde_json::{json, Value};

use super::status::{ApiError, ApiResult};
use super::{bytes_response, json_response, read_body, watch, ApiServer, Body, Query, Target};
use crate::cache::CachedObject;
use crate::patch::PatchType;
use crate::printers;
use crate::registry::{
    scale_of, DeleteOptions, FieldValidation, PatchRequest, WriteOptions, Written,
};
use crate::resources::{ResourceInfo, Subresource};
use crate::selector::{self, FieldSelector, LabelSelector};

/// How a response should be encoded, from the Accept header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Table,
}

pub fn encoding(req: &Request<Incoming>) -> ApiResult<Encoding> {
    let accept = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("as=Table") {
        return Ok(Encoding::Table);
    }
    let acceptable = accept.is_empty()
        || accept.split(',').any(|m| {
            let m = m.trim();
            m.starts_with("application/json")
                || m.starts_with("*/*")
                || m.starts_with("application/*")
                || m.starts_with("application/yaml")
        });
    if acceptable {
        Ok(Encoding::Json)
    } else {
        Err(ApiError::not_acceptable(accept))
    }
}

/// A request filter: label and field selectors, checked against the type.
pub struct Filter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    kind: &'static str,
    has_fields: bool,
}

impl Filter {
    pub fn from_query(res: &'static ResourceInfo, query: &Query) -> ApiResult<Filter> {
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let field_text = query.get("fieldSelector").map_or("", String::as_str);
        let fields =
            FieldSelector::parse(field_text).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let Some(bad) = fields
            .fields()
            .find(|f| !selector::supported_field(res.kind, f))
        {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {bad} (for {})",
                res.qualified_plural()
            )));
        }
        Ok(Filter {
            labels,
            fields,
            kind: res.kind,
            has_fields: !field_text.trim().is_empty(),
        })
    }

    pub fn matches(&self, obj: &CachedObject) -> bool {
        if !self.labels.matches(&obj.labels) {
            return false;
        }
        if !self.has_fields {
            return true;
        }
        let value = obj.value();
        self.fields
            .matches(|f| selector::object_field(self.kind, &value, f))
    }
}

pub async fn dispatch(
    server: &Arc<ApiServer>,
    verb: &str,
    target: Target,
    query: Query,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let encoding = encoding(&req)?;
    match verb {
        "get" if target.subresource == Some(Subresource::Log) => {
            super::logs::serve(
                server,
                target.namespace.as_deref().unwrap_or("default"),
                name(&target),
                &query,
            )
            .await
        }
        "get" => get(server, &target, &query, encoding),
        "list" => list(server, &target, &query, encoding),
        "watch" => watch::serve(server.clone(), target, query, encoding).await,
        "create" => create(server, &target, &query, req).await,
        "update" => update(server, &target, &query, req).await,
        "patch" => patch(server, &target, &query, req).await,
        "delete" => delete(server, &target, &query, req).await,
        "deletecollection" => delete_collection(server, &target, &query, req).await,
        other => Err(ApiError::method_not_allowed(other, target.res.plural)),
    }
}

fn name(target: &Target) -> &str {
    target.name.as_deref().unwrap_or_default()
}

fn get(
    server: &ApiServer,
    target: &Target,
    query: &Query,
    encoding: Encoding,
) -> ApiResult<Response<Body>> {
    let obj = server
        .registry
        .get(target.res, target.namespace.as_deref(), name(target))?;
    if target.subresource == Some(Subresource::Scale) {
        return Ok(json_response(200, &scale_of(&obj.value())));
    }
    match encoding {
        Encoding::Table => {
            let table = table(
                target.res,
                &[obj.value()],
                &obj.revision.to_string(),
                None,
                include_object(query),
                true,
            );
            Ok(json_response(200, &table))
        }
        Encoding::Json => Ok(bytes_response(200, obj.json.clone())),
    }
}

pub fn include_object(query: &Query) -> &str {
    query
        .get("includeObject")
        .map_or("Metadata", String::as_str)
}

fn decode_continue(token: &str) -> ApiResult<String> {
    let bad =
        || ApiError::bad_request("continue key is not valid: it was not produced by this server");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    v.get("start")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(bad)
}

fn encode_continue(revision: i64, last_key: &str) -> String {
    let token = json!({"rv": revision, "start": last_key});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn list(
    server: &ApiServer,
    target: &Target,
    query: &Query,
    encoding: Encoding,
) -> ApiResult<Response<Body>> {
    let filter = Filter::from_query(target.res, query)?;
    let limit = match query.get("limit") {
        Some(l) => l.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("limit must be a non-negative integer, got {l:?}"))
        })?,
        None => 0,
    };
    let after = query
        .get("continue")
        .filter(|c| !c.is_empty())
        .map(|c| decode_continue(c))
        .transpose()?;
    let prefix = target.res.scope_prefix(target.namespace.as_deref());
    let (items, revision) = server.registry.cache().list(&prefix, after.as_deref());
    let mut selected = Vec::new();
    let mut remaining = 0usize;
    let mut next = None;
    for obj in items.iter().filter(|o| filter.matches(o)) {
        if limit > 0 && selected.len() == limit {
            remaining += 1;
            continue;
        }
        selected.push(obj.clone());
    }
    if remaining > 0 {
        next = selected.last().map(|o| encode_continue(revision, &o.key));
    }
    let rv = revision.to_string();
    if encoding == Encoding::Table {
        let values: Vec<Value> = selected.iter().map(|o| o.value()).collect();
        let mut t = table(
            target.res,
            &values,
            &rv,
            next.as_deref(),
            include_object(query),
            true,
        );
        if remaining > 0 {
            t["metadata"]["remainingItemCount"] = json!(remaining);
        }
        return Ok(json_response(200, &t));
    }
    // Items are spliced in as stored bytes: no re-encoding of the whole list.
    let mut metadata = json!({"resourceVersion": rv});
    if let Some(token) = &next {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(remaining);
    }
    let head = format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
        target.res.list_kind(),
        target.res.api_version(),
        metadata
    );
    let size = head.len() + selected.iter().map(|o| o.json.len() + 1).sum::<usize>() + 2;
    let mut out = BytesMut::with_capacity(size);
    out.put_slice(head.as_bytes());
    for (i, obj) in selected.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(&obj.json);
    }
    out.put_slice(b"]}");
    Ok(bytes_response(200, out.freeze()))
}

/// A meta.k8s.io/v1 Table of `objects` with the type's columns.
pub fn table(
    res: &ResourceInfo,
    objects: &[Value],
    resource_version: &str,
    continue_token: Option<&str>,
    include_object: &str,
    with_columns: bool,
) -> Value {
    let now = chrono::Utc::now();
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let object = match include_object {
                "None" => Value::Null,
                "Object" => obj.clone(),
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
                }),
            };
            json!({"cells": printers::cells(res.kind, obj, now), "object": object})
        })
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    let mut t = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "rows": rows});
    if with_columns {
        t["columnDefinitions"] = printers::column_definitions_json(res.kind);
    }
    t
}

fn write_options(query: &Query) -> ApiResult<WriteOptions> {
    let dry_run = match query.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: unsupported value {other:?}; only \"All\" is supported"
            )))
        }
    };
    Ok(WriteOptions {
        dry_run,
        field_validation: FieldValidation::parse(
            query.get("fieldValidation").map_or("", String::as_str),
        )?,
    })
}

fn content_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Decodes an object body (JSON, YAML, or the protobuf kubectl's typed
/// commands send).
async fn object_body(res: &ResourceInfo, req: Request<Incoming>) -> ApiResult<Value> {
    let ct = content_type(&req);
    let body = read_body(req.into_body()).await?;
    match ct.as_str() {
        "application/vnd.kubernetes.protobuf" => {
            crate::protobuf::decode(res.kind, &body).map_err(ApiError::bad_request)
        }
        "application/json" | "" => serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        "application/yaml" | "application/x-yaml" | "text/yaml" => serde_yaml::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

fn written_response(written: Written, code: u16) -> Response<Body> {
    let mut resp = bytes_response(code, written.json());
    for w in written.warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {:?}", w)) {
            resp.headers_mut().append("Warning", v);
        }
    }
    resp
}

async fn create(
    server: &ApiServer,
    target: &Target,
    query: &Query,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let opts = write_options(query)?;
    let body = object_body(target.res, req).await?;
    let written = server
        .registry
        .create(target.res, target.namespace.as_deref(), body, opts)
        .await?;
    Ok(written_response(written, 201))
}

async fn update(
    server: &ApiServer,
    target: &Target,
    query: &Query,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let opts = write_options(query)?;
    let body = object_body(target.res, req).await?;
    let written = server
        .registry
        .update(
            target.res,
            target.namespace.as_deref(),
            name(target),
            body,
            target.subresource,
            opts,
        )
        .await?;
    let code = if written.created { 201 } else { 200 };
    Ok(written_response(written, code))
}

async fn patch(
    server: &ApiServer,
    target: &Target,
    query: &Query,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let opts = write_options(query)?;
    let ct = content_type(&req);
    let patch_type = match PatchType::from_content_type(&ct) {
        Some(t) => t,
        None if ct == "application/apply-patch+yaml" => {
            return Err(ApiError::unsupported_media_type(
                "application/apply-patch+yaml (server-side apply is not supported by ferry; use client-side kubectl apply)",
            ))
        }
        None => return Err(ApiError::unsupported_media_type(&ct)),
    };
    let body = read_body(req.into_body()).await?;
    let patch_body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
    let written = server
        .registry
        .patch(
            target.res,
            target.namespace.as_deref(),
            name(target),
            PatchRequest {
                patch_type,
                body: &patch_body,
            },
            target.subresource,
            opts,
        )
        .await?;
    Ok(written_response(written, 200))
}

async fn delete_options(query: &Query, req: Request<Incoming>) -> ApiResult<DeleteOptions> {
    let body = read_body(req.into_body()).await?;
    let mut opts = DeleteOptions::default();
    if !body.is_empty() {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions is not valid JSON: {e}")))?;
        opts.grace_period_seconds = v.get("gracePeriodSeconds").and_then(Value::as_i64);
        opts.precondition_uid = v
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string);
        opts.precondition_resource_version = v
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        opts.dry_run = v
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
    }
    if let Some(g) = query.get("gracePeriodSeconds") {
        opts.grace_period_seconds = Some(g.parse().map_err(|_| {
            ApiError::bad_request(format!("gracePeriodSeconds must be an integer, got {g:?}"))
        })?);
    }
    opts.dry_run |= write_options(query)?.dry_run;
    Ok(opts)
}

async fn delete(
    server: &ApiServer,
    target: &Target,
    query: &Query,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let opts = delete_options(query, req).await?;
    let obj = server
        .registry
        .delete(target.res, target.namespace.as_deref(), name(target), &opts)
        .await?;
    let pending = obj.pointer("/metadata/deletionTimestamp").is_some();
    Ok(json_response(if pending { 202 } else { 200 }, &obj))
}

async fn delete_collection(
    server: &ApiServer,
    target: &Target,
    query: &Query,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let filter = Filter::from_query(target.res, query)?;
    let opts = delete_options(query, req).await?;
    let prefix = target.res.scope_prefix(target.namespace.as_deref());
    let (items, _) = server.registry.cache().list(&prefix, None);
    let mut deleted = Vec::new();
    for obj in items.iter().filter(|o| filter.matches(o)) {
        let value = obj.value();
        let ns = value.pointer("/metadata/namespace").and_then(Value::as_str);
        let obj_name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match server
            .registry
            .delete(target.res, ns, obj_name, &opts)
            .await
        {
            Ok(v) => deleted.push(v),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let list = json!({
        "kind": target.res.list_kind(),
        "apiVersion": target.res.api_version(),
        "metadata": {"resourceVersion": server.registry.cache().revision().to_string()},
        "items": deleted,
    });
    Ok(json_response(200, &list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = encode_continue(42, "/registry/core/services/default/b");
        assert_eq!(
            decode_continue(&token).unwrap(),
            "/registry/core/services/default/b"
        );
        assert_eq!(decode_continue("not-a-token").unwrap_err().code, 400);
    }

    #[test]
    fn tables_carry_partial_metadata_by_default() {
        let res = crate::resources::find_kind("ConfigMap").unwrap();
        let cm = json!({"metadata": {"name": "c", "namespace": "default", "creationTimestamp": "2026-01-01T00:00:00Z"}, "data": {"a": "1"}});
        let t = table(res, &[cm], "5", None, "Metadata", true);
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["cells"][0], "c");
        assert!(t["columnDefinitions"]
            .as_array()
            .is_some_and(|c| !c.is_empty()));
    }
}
