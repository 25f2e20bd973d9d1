//! What both listeners share: the store, the lookup cache, the counters and the settings.
use crate::lookup_cache::LookupCache;
use crate::metrics::{self, Metrics};
use crate::store::{Changes, Store, StoreError};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, Semaphore};

pub struct Service {
    pub store: Arc<Store>,
    pub cache: LookupCache,
    pub metrics: Metrics,
    /// Every `/v1/` request must carry it, when set.
    pub proxy_token: Option<String>,
    /// The prefixes new keys may have; the first is the default.
    pub prefixes: Vec<String>,
    /// How long the change log keeps changes.
    pub changes_kept_s: i64,
    /// Where the feed stood when this process last read it (-1: not yet): a poll at it has
    /// nothing new.
    pub feed_bound: AtomicI64,
    /// An admin change was made through this process: the log is read at once, so that the
    /// feed lists it without waiting for the next period.
    pub wrote: Notify,
    /// Slots for database calls (`MAX_DATABASE_CALLS`).
    pub database_calls: Arc<Semaphore>,
}

pub type Shared = Arc<Service>;

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Database calls under way at most: a storm of cold lookups waits for a slot instead of
/// opening a connection each (PostgreSQL's default limit is 100 connections in all).
pub const MAX_DATABASE_CALLS: usize = 16;

/// Runs a database call off the async threads, once one of `MAX_DATABASE_CALLS` is free.
pub async fn blocking<T: Send + 'static>(
    service: &Shared,
    f: impl FnOnce(&Service) -> T + Send + 'static,
) -> Option<T> {
    let slot = service.database_calls.clone().acquire_owned().await.ok()?;
    let done = unqueued(service, f).await;
    drop(slot);
    done
}

/// Runs a database call off the async threads at once: reading the change log, one call at
/// a time, must not wait behind a storm of lookups (the lookup cache is trusted only while
/// this process keeps reporting how far it read).
async fn unqueued<T: Send + 'static>(
    service: &Shared,
    f: impl FnOnce(&Service) -> T + Send + 'static,
) -> Option<T> {
    let service = service.clone();
    tokio::task::spawn_blocking(move || f(&service)).await.ok()
}

impl Service {
    pub fn counted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Db(why)) = &result {
            metrics::add(&self.metrics.store_errors);
            eprintln!("apikey-keyservice: database error: {why}");
        }
        result
    }
}

/// Keeps the lookup cache coherent with changes made through any process on the same
/// database: every `every`, and at once after a change made through this process, reads
/// the change log on from where it stands, forgets what changed, and tells the database how
/// far this process has read (the feed waits for it). Once a minute, prunes the change log.
pub async fn follow_changes(service: Shared, every: Duration) {
    let process = crate::issue::new_process_id().unwrap_or_else(|_| format!("p{}", now()));
    let mut applied: Option<i64> = None;
    let mut pruned_at = 0;
    loop {
        let after = applied;
        let read = unqueued(&service, move |s| match after {
            // Starting (or after the log was pruned past us): from where it stands, with
            // nothing in memory.
            None => s.store.head().map(|head| Changes::Listed {
                key_hashes: Vec::new(),
                last: head,
            }),
            Some(after) => s.store.tail(after, 10_000),
        })
        .await;
        match read {
            Some(Ok(Changes::Listed { key_hashes, last })) => {
                if after.is_none() {
                    service.cache.forget_all();
                } else if !key_hashes.is_empty() {
                    service.cache.forget(key_hashes.iter().map(String::as_str));
                }
                applied = Some(last);
                let id = process.clone();
                let told = unqueued(&service, move |s| s.store.report_process(&id, last)).await;
                let mut bound = -1;
                if let Some(Ok(())) = told {
                    service.cache.reported();
                    let read = unqueued(&service, |s| s.store.changes(None, 0)).await;
                    if let Some(Ok(Changes::Listed { last, .. })) = read {
                        bound = last;
                    }
                }
                // Not read, or not told: polls go to the database (which may be failing).
                service.feed_bound.store(bound, Ordering::Release);
            }
            Some(Ok(Changes::Gone)) => {
                applied = None;
                service.feed_bound.store(-1, Ordering::Release);
            }
            // Not read: the cache stops being used once its report is too old, and polls go
            // to the database.
            _ => service.feed_bound.store(-1, Ordering::Release),
        }
        let now = now();
        if now - pruned_at >= 60 {
            pruned_at = now;
            let before = now - service.changes_kept_s;
            let _ = unqueued(&service, move |s| s.store.prune_changes(before)).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = service.wrote.notified() => {}
        }
    }
}
