//! The admin API: keys created, shown, listed, updated, revoked, rotated and deleted, and
//! the audit log, behind admin tokens. Every refusal is
//! `{"error": {"code": CODE, "message": TEXT}}` and changes nothing.
use crate::issue::key_hash;
use crate::keys::{self, view, Issued, Refused};
use crate::metrics;
use crate::record::{object, InvalidField, RECORD_FIELDS};
use crate::service::{blocking, now, Shared};
use crate::store::StoreError;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// `rotate`'s grace period when the call names none: a day.
pub const DEFAULT_GRACE_S: i64 = 86_400;
const MAX_PAGE: u32 = 1_000;

pub fn routes(service: Shared) -> Router {
    Router::new()
        .route("/admin/v1/keys", post(create).get(list))
        .route(
            "/admin/v1/keys/{key_id}",
            get(show).patch(update).delete(delete),
        )
        .route("/admin/v1/keys/{key_id}/revoke", post(revoke))
        .route("/admin/v1/keys/{key_id}/rotate", post(rotate))
        .route("/admin/v1/audit", get(audit))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(service)
}

fn answer(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(service: &Shared, status: StatusCode, code: &str, message: &str) -> Response {
    metrics::add(&service.metrics.admin_refused);
    let body = json!({"error": {"code": code, "message": message}});
    answer(status, body)
}

fn refusal(service: &Shared, refused: Refused) -> Response {
    match refused {
        Refused::Invalid(field) => invalid(service, &field),
        Refused::NotFound => error(service, StatusCode::NOT_FOUND, "not_found", "no such key"),
        Refused::Conflict(why) => error(service, StatusCode::CONFLICT, "conflict", &why),
        Refused::Failed(why) => {
            eprintln!("apikey-keyservice: admin call failed: {why}");
            let status = StatusCode::SERVICE_UNAVAILABLE;
            error(service, status, "unavailable", "the key service failed")
        }
    }
}

fn invalid(service: &Shared, field: &InvalidField) -> Response {
    let status = StatusCode::BAD_REQUEST;
    error(service, status, "invalid_field", &field.message())
}

/// The name of the admin token the request carries, if it is valid.
async fn actor(service: &Shared, headers: &HeaderMap) -> Result<String, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty());
    let unauthorized = || {
        let status = StatusCode::UNAUTHORIZED;
        error(service, status, "unauthorized", "no valid admin token")
    };
    let Some(token) = token else {
        return Err(unauthorized());
    };
    let hash = key_hash(token);
    let found = blocking(service, move |s| s.store.admin_token_name(&hash)).await;
    match found {
        Some(Ok(Some(name))) => Ok(name),
        Some(Ok(None)) => Err(unauthorized()),
        _ => Err(refusal(
            service,
            Refused::Failed("reading admin tokens".into()),
        )),
    }
}

/// Runs an admin change, and forgets what it changed from the lookup cache.
async fn change<T: Send + 'static>(
    service: &Shared,
    f: impl FnOnce(&crate::service::Service) -> Result<T, Refused> + Send + 'static,
    hashes: impl Fn(&T) -> Vec<String>,
) -> Result<T, Response> {
    match blocking(service, f).await {
        Some(Ok(done)) => {
            metrics::add(&service.metrics.admin_changes);
            let changed = hashes(&done);
            service.cache.forget(changed.iter().map(String::as_str));
            service.wrote.notify_one();
            Ok(done)
        }
        Some(Err(refused)) => Err(refusal(service, refused)),
        None => Err(refusal(service, Refused::Failed("the call was cut".into()))),
    }
}

fn parse(body: &Bytes) -> Result<Value, InvalidField> {
    if body.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| InvalidField::new("", format!("not JSON: {e}")))
}

fn optional_str<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, InvalidField> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= 256 => Ok(Some(s)),
        Some(_) => Err(InvalidField::new(
            name,
            "must be a string of at most 256 bytes",
        )),
    }
}

fn issued(issued: &Issued) -> Value {
    let mut view = view(&issued.row);
    if let Value::Object(fields) = &mut view {
        fields.insert("key".into(), Value::String(issued.key.clone()));
    }
    view
}

async fn create(State(service): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let actor = match actor(&service, &headers).await {
        Ok(actor) => actor,
        Err(refused) => return refused,
    };
    let mut allowed = RECORD_FIELDS.to_vec();
    allowed.extend(["name", "prefix"]);
    let checked = parse(&body).and_then(|body| {
        let fields = object(&body, &allowed)?.clone();
        let name = optional_str(&fields, "name")?
            .unwrap_or_default()
            .to_string();
        let prefix = match optional_str(&fields, "prefix")? {
            None => service.prefixes.first().cloned().unwrap_or_default(),
            Some(p) if service.prefixes.iter().any(|allowed| allowed == p) => p.to_string(),
            Some(_) => return Err(InvalidField::new("prefix", "not one of --key-prefixes")),
        };
        Ok((fields, name, prefix))
    });
    let (fields, name, prefix) = match checked {
        Ok(checked) => checked,
        Err(field) => return invalid(&service, &field),
    };
    let made = change(
        &service,
        move |s| keys::create(&s.store, &actor, now(), &prefix, &name, &fields),
        |done: &Issued| vec![done.row.key_hash.clone()],
    )
    .await;
    match made {
        Ok(done) => answer(StatusCode::CREATED, issued(&done)),
        Err(refused) => refused,
    }
}

async fn show(
    State(service): State<Shared>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = actor(&service, &headers).await {
        return refused;
    }
    let read = blocking(&service, move |s| s.store.key_by_id(&key_id)).await;
    read_answer(&service, read, |row| answer(StatusCode::OK, view(&row)))
}

/// A listing's query, and its `limit`: 1 to `MAX_PAGE`, 100 when not given.
fn paged<Q>(
    service: &Shared,
    query: Result<Query<Q>, QueryRejection>,
    limit_of: impl Fn(&Q) -> Option<u32>,
) -> Result<(Q, u32), Response> {
    let Query(query) = query.map_err(|bad| {
        let field = InvalidField::new("", bad.body_text());
        invalid(service, &field)
    })?;
    let limit = limit_of(&query).unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        let field = InvalidField::new("limit", format!("must be between 1 and {MAX_PAGE}"));
        return Err(invalid(service, &field));
    }
    Ok((query, limit))
}

/// A read's answer: `ok` of what was read, else the error.
fn read_answer<T>(
    service: &Shared,
    read: Option<Result<T, StoreError>>,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    match read {
        Some(Ok(done)) => ok(done),
        Some(Err(e)) => refusal(service, e.into()),
        None => refusal(service, Refused::Failed("the call was cut".into())),
    }
}

/// Where the next page starts (`after`), when this one is full.
fn next_page<T>(items: &[T], limit: u32, after: impl Fn(&T) -> Value) -> Value {
    match items.last() {
        Some(last) if items.len() == limit as usize => after(last),
        _ => Value::Null,
    }
}

#[derive(Deserialize)]
struct ListQuery {
    owner: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

async fn list(
    State(service): State<Shared>,
    query: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = actor(&service, &headers).await {
        return refused;
    }
    let (query, limit) = match paged(&service, query, |q| q.limit) {
        Ok(paged) => paged,
        Err(refused) => return refused,
    };
    let read = blocking(&service, move |s| {
        s.store
            .list(query.owner.as_deref(), query.after.as_deref(), limit)
    })
    .await;
    read_answer(&service, read, |rows| {
        let next = next_page(&rows, limit, |last| json!(last.key_id));
        let keys: Vec<Value> = rows.iter().map(view).collect();
        answer(StatusCode::OK, json!({"keys": keys, "next": next}))
    })
}

async fn update(
    State(service): State<Shared>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let actor = match actor(&service, &headers).await {
        Ok(actor) => actor,
        Err(refused) => return refused,
    };
    let mut allowed = RECORD_FIELDS.to_vec();
    allowed.push("name");
    let checked = parse(&body).and_then(|body| {
        let fields = object(&body, &allowed)?.clone();
        let name = optional_str(&fields, "name")?.map(str::to_string);
        Ok((fields, name))
    });
    let (fields, name) = match checked {
        Ok(checked) => checked,
        Err(field) => return invalid(&service, &field),
    };
    let done = change(
        &service,
        move |s| keys::update(&s.store, &actor, now(), &key_id, name.as_deref(), &fields),
        |row| vec![row.key_hash.clone()],
    )
    .await;
    match done {
        Ok(row) => answer(StatusCode::OK, view(&row)),
        Err(refused) => refused,
    }
}

async fn revoke(
    State(service): State<Shared>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let actor = match actor(&service, &headers).await {
        Ok(actor) => actor,
        Err(refused) => return refused,
    };
    let done = change(
        &service,
        move |s| keys::revoke(&s.store, &actor, now(), &key_id),
        |row| vec![row.key_hash.clone()],
    )
    .await;
    match done {
        Ok(row) => answer(StatusCode::OK, view(&row)),
        Err(refused) => refused,
    }
}

async fn rotate(
    State(service): State<Shared>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let actor = match actor(&service, &headers).await {
        Ok(actor) => actor,
        Err(refused) => return refused,
    };
    let checked = parse(&body).and_then(|body| {
        let fields = object(&body, &["grace_s"])?.clone();
        match fields.get("grace_s") {
            None | Some(Value::Null) => Ok(DEFAULT_GRACE_S),
            Some(v) => v
                .as_i64()
                .filter(|g| (0..=31_536_000).contains(g))
                .ok_or_else(|| InvalidField::new("grace_s", "must be 0 to 31536000 seconds")),
        }
    });
    let grace_s = match checked {
        Ok(grace_s) => grace_s,
        Err(field) => return invalid(&service, &field),
    };
    let prefix = service.prefixes.first().cloned().unwrap_or_default();
    let done = change(
        &service,
        move |s| keys::rotate(&s.store, &actor, now(), &key_id, grace_s, &prefix),
        // The old key's record changed too (its deadline).
        |(new, old_hash)| vec![new.row.key_hash.clone(), old_hash.clone()],
    )
    .await;
    match done {
        Ok((new, _)) => answer(StatusCode::CREATED, issued(&new)),
        Err(refused) => refused,
    }
}

async fn delete(
    State(service): State<Shared>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let actor = match actor(&service, &headers).await {
        Ok(actor) => actor,
        Err(refused) => return refused,
    };
    let done = change(
        &service,
        move |s| keys::delete(&s.store, &actor, now(), &key_id),
        |key_hash: &String| vec![key_hash.clone()],
    )
    .await;
    match done {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => refused,
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    key_id: Option<String>,
    limit: Option<u32>,
    after: Option<i64>,
}

async fn audit(
    State(service): State<Shared>,
    query: Result<Query<AuditQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = actor(&service, &headers).await {
        return refused;
    }
    let (query, limit) = match paged(&service, query, |q| q.limit) {
        Ok(paged) => paged,
        Err(refused) => return refused,
    };
    let read = blocking(&service, move |s| {
        s.store.audit(query.key_id.as_deref(), query.after, limit)
    })
    .await;
    read_answer(&service, read, |events| {
        let next = next_page(&events, limit, |last| json!(last.id));
        answer(StatusCode::OK, json!({"events": events, "next": next}))
    })
}

async fn metrics_text(State(service): State<Shared>) -> Response {
    let gauges = [(
        "lookup_cache_entries",
        "Records held in memory for lookups.",
        service.cache.len() as u64,
    )];
    let text = service.metrics.render(&gauges);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
