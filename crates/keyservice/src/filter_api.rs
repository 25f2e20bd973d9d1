//! The filter's API (CONTRACT "Key service protocol" and "Change feed"): lookups by key
//! hash, and the change feed.
use crate::metrics;
use crate::service::{blocking, Shared};
use crate::store::Changes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use std::sync::atomic::Ordering;

/// Hashes a feed answer lists at most; the cursor then says where to go on.
const FEED_PAGE: u32 = 10_000;

pub fn routes(service: Shared) -> Router {
    Router::new()
        .route("/v1/keys/{key_hash}", get(lookup))
        .route("/v1/key-changes", get(changes))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(service)
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Whether the request carries the proxy token, when one is configured.
fn allowed(service: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = &service.proxy_token else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    constant_time_eq(presented.as_bytes(), token.as_bytes())
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refused(service: &Shared, status: StatusCode, message: &str) -> Response {
    metrics::add(&service.metrics.lookups_refused);
    let body = serde_json::json!({"error": {"code": status.as_u16(), "message": message}});
    json(status, body.to_string())
}

async fn lookup(
    State(service): State<Shared>,
    Path(key_hash): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !allowed(&service, &headers) {
        return refused(&service, StatusCode::UNAUTHORIZED, "no valid proxy token");
    }
    let is_hash = key_hash.len() == 64
        && key_hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hash {
        return refused(
            &service,
            StatusCode::BAD_REQUEST,
            "not a lowercase hex SHA-256",
        );
    }
    let answer = match service.cache.get(&key_hash) {
        Some(answer) => {
            metrics::add(&service.metrics.lookups_from_memory);
            answer
        }
        None => {
            let generation = service.cache.generation();
            let hash = key_hash.clone();
            let read = blocking(&service, move |s| s.counted(s.store.record_by_hash(&hash))).await;
            let Some(Ok(record)) = read else {
                return refused(&service, StatusCode::SERVICE_UNAVAILABLE, "database error");
            };
            let answer = record.map(std::sync::Arc::from);
            service.cache.keep(&key_hash, answer.clone(), generation);
            answer
        }
    };
    match answer {
        Some(record) => {
            metrics::add(&service.metrics.lookups_found);
            json(StatusCode::OK, record.to_string())
        }
        None => {
            metrics::add(&service.metrics.lookups_not_found);
            json(StatusCode::NOT_FOUND, r#"{"error": "not_found"}"#.into())
        }
    }
}

#[derive(Deserialize)]
struct FeedQuery {
    after: Option<String>,
}

async fn changes(
    State(service): State<Shared>,
    Query(query): Query<FeedQuery>,
    headers: HeaderMap,
) -> Response {
    if !allowed(&service, &headers) {
        return refused(&service, StatusCode::UNAUTHORIZED, "no valid proxy token");
    }
    // A cursor this service did not make is too old for it: the filter starts again.
    let after = match query.after.as_deref().map(parse_cursor) {
        None => None,
        Some(Some(seq)) => Some(seq),
        Some(None) => return gone(&service),
    };
    // Most polls find nothing new: a cursor at the feed's bound as the service last read it
    // (within a tail period) is answered from memory. Nothing is missed: a change past it is
    // listed by a later poll with the same cursor.
    if after.is_some_and(|after| after == service.feed_bound.load(Ordering::Acquire)) {
        metrics::add(&service.metrics.feed_polls);
        metrics::add(&service.metrics.feed_polls_from_memory);
        return listed(&[], after.unwrap_or_default());
    }
    let read = blocking(&service, move |s| {
        s.counted(s.store.changes(after, FEED_PAGE))
    })
    .await;
    match read {
        Some(Ok(Changes::Listed { key_hashes, last })) => {
            metrics::add(&service.metrics.feed_polls);
            listed(&key_hashes, last)
        }
        Some(Ok(Changes::Gone)) => gone(&service),
        _ => refused(&service, StatusCode::SERVICE_UNAVAILABLE, "database error"),
    }
}

fn listed(key_hashes: &[String], last: i64) -> Response {
    let body = serde_json::json!({"cursor": format!("c-{last}"), "key_hashes": key_hashes});
    json(StatusCode::OK, body.to_string())
}

fn gone(service: &Shared) -> Response {
    metrics::add(&service.metrics.feed_gone);
    json(StatusCode::GONE, r#"{"error": "cursor_too_old"}"#.into())
}

fn parse_cursor(cursor: &str) -> Option<i64> {
    cursor.strip_prefix("c-")?.parse().ok().filter(|&n| n >= 0)
}
