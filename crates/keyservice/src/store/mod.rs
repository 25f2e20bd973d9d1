//! Where keys live: SQLite (`sqlite:PATH`, the embedded default) or PostgreSQL
//! (`postgres://...`, for fleets: any number of `serve` processes on one database). Only a
//! key's hash is stored, never the key.
//!
//! Every change to a key appends its hash to the change log in the same transaction, and
//! every admin change an event to the audit log. Write transactions take one lock first
//! (SQLite's write lock, `BEGIN IMMEDIATE`; PostgreSQL's transaction-level advisory lock)
//! and hold it until they commit, so they commit one at a time in the order of their change
//! log numbers: once a reader has seen number N, no change numbered below N can still
//! commit. (A plain sequence does not give that: a writer that took number 9 may commit
//! after one that took 10, behind a cursor that already moved past 10.)
//!
//! The feed lists a change only once every live `serve` process on the database has read it
//! from the log and forgotten the key from its lookup cache (`processes`): a filter that
//! learns of a change from any process can look the key up at any process and get the new
//! record.
mod postgres;
mod sqlite;

use serde_json::{Map, Value};

#[derive(Debug)]
pub enum StoreError {
    NotFound,
    Conflict(String),
    Db(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A key as stored: its record (the contract's fields, as the filter gets them) and what
/// the service knows of it besides.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub key_id: String,
    pub key_hash: String,
    pub name: String,
    pub record: Map<String, Value>,
    pub created_at: i64,
    pub updated_at: i64,
    pub revoked_at: Option<i64>,
    pub rotated_from: Option<String>,
    pub rotated_to: Option<String>,
}

impl KeyRow {
    pub fn owner(&self) -> &str {
        self.record
            .get("owner")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn record_text(&self) -> String {
        Value::Object(self.record.clone()).to_string()
    }
}

/// Reads a stored record back (a record the service wrote: always an object).
pub fn record_of(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    }
}

/// One admin change, for the audit log: never a key, only what changed.
pub struct Event<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub key_id: &'a str,
    pub changes: Value,
}

/// What the change log holds after a cursor.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// The hashes changed after the cursor (each once, at most the limit), and the cursor
    /// after them.
    Listed { key_hashes: Vec<String>, last: i64 },
    /// Changes after the cursor were pruned (or the cursor was never made): start again.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEvent {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub key_id: String,
    pub changes: Value,
}

/// The tables, on both databases: `serial` is the database's auto-numbered key (never
/// reused once its rows are deleted, so a pruned change number is never seen again).
pub fn schema(serial: &str) -> String {
    format!(
        "
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revoked_at BIGINT,
    rotated_from TEXT,
    rotated_to TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_owner ON keys (owner, key_id);
CREATE TABLE IF NOT EXISTS changes (
    seq {serial},
    key_hash TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id {serial},
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT NOT NULL,
    changes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_key ON audit (key_id, id);
CREATE TABLE IF NOT EXISTS admin_tokens (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE IF NOT EXISTS processes (
    process TEXT PRIMARY KEY,
    through BIGINT NOT NULL,
    reported_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
"
    )
}

/// The columns of a key, in `KeyRow`'s order.
pub const KEY_COLUMNS: &str = "key_id, key_hash, name, record, created_at, updated_at, \
                               revoked_at, rotated_from, rotated_to";

/// A process is live while its last report is younger than this: the feed waits for the
/// live ones only.
pub const PROCESS_LIVE_MS: i64 = 5_000;

/// Writes within a transaction: each keeps the change log and the audit log with it.
pub trait Writes {
    fn key(&mut self, key_id: &str) -> StoreResult<KeyRow>;
    fn insert_key(&mut self, row: &KeyRow) -> StoreResult<()>;
    fn update_key(&mut self, row: &KeyRow) -> StoreResult<()>;
    fn delete_key(&mut self, key_id: &str) -> StoreResult<()>;
    fn log_change(&mut self, key_hash: &str, at: i64) -> StoreResult<()>;
    fn log_event(&mut self, at: i64, event: &Event) -> StoreResult<()>;
}

pub enum Store {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

macro_rules! each {
    ($self:ident, $db:ident => $call:expr) => {
        match $self {
            Store::Sqlite($db) => $call,
            Store::Postgres($db) => $call,
        }
    };
}

impl Store {
    /// Opens (or creates) the database `url`: `sqlite:PATH` or `postgres://...`.
    pub fn open(url: &str) -> Result<Store, String> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let db = sqlite::Sqlite::open(std::path::Path::new(path));
            return db.map(Store::Sqlite).map_err(|e| format!("{e:?}"));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let db = postgres::Postgres::open(url);
            return db.map(Store::Postgres).map_err(|e| format!("{e:?}"));
        }
        Err("the database must be sqlite:PATH or postgres://...".into())
    }

    /// Runs `f` in a write transaction, committed when it returns `Ok`.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut dyn Writes) -> Result<T, E>,
    ) -> Result<T, E> {
        each!(self, db => db.write(f))
    }

    pub fn key_by_id(&self, key_id: &str) -> StoreResult<KeyRow> {
        each!(self, db => db.key_by_id(key_id))
    }

    /// The record the filter gets for `key_hash` (None: no such key).
    pub fn record_by_hash(&self, key_hash: &str) -> StoreResult<Option<String>> {
        each!(self, db => db.record_by_hash(key_hash))
    }

    /// Keys in `key_id` order after `after`, of `owner` if given.
    pub fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<KeyRow>> {
        each!(self, db => db.list(owner, after, limit))
    }

    /// The change log after number `after` as the feed lists it (None: where the feed
    /// stands), at most `limit` numbers: only what every live process has forgotten.
    pub fn changes(&self, after: Option<i64>, limit: u32) -> StoreResult<Changes> {
        each!(self, db => db.changes(after, limit))
    }

    /// The change log after `after` as it is, for a process's own lookup cache.
    pub fn tail(&self, after: i64, limit: u32) -> StoreResult<Changes> {
        each!(self, db => db.tail(after, limit))
    }

    /// The newest change's number.
    pub fn head(&self) -> StoreResult<i64> {
        each!(self, db => db.head())
    }

    /// Process `process` has forgotten every change through `through` from its cache.
    pub fn report_process(&self, process: &str, through: i64) -> StoreResult<()> {
        each!(self, db => db.report_process(process, through))
    }

    /// Forgets changes made before `before` (Unix seconds); polls from before them get 410.
    pub fn prune_changes(&self, before: i64) -> StoreResult<usize> {
        each!(self, db => db.prune_changes(before))
    }

    pub fn audit(
        &self,
        key_id: Option<&str>,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEvent>> {
        each!(self, db => db.audit(key_id, after, limit))
    }

    /// The name of the admin token with hash `token_hash`, unless revoked.
    pub fn admin_token_name(&self, token_hash: &str) -> StoreResult<Option<String>> {
        each!(self, db => db.admin_token_name(token_hash))
    }

    pub fn add_admin_token(&self, name: &str, token_hash: &str, now: i64) -> StoreResult<()> {
        each!(self, db => db.add_admin_token(name, token_hash, now))
    }

    /// Admin tokens: name, created, revoked.
    pub fn admin_tokens(&self) -> StoreResult<Vec<(String, i64, Option<i64>)>> {
        each!(self, db => db.admin_tokens())
    }

    pub fn revoke_admin_token(&self, name: &str, now: i64) -> StoreResult<()> {
        each!(self, db => db.revoke_admin_token(name, now))
    }
}

/// The hashes of change log rows `(seq, key_hash)` in order, each once, and the last
/// number (`after` when there are none).
pub fn listed(rows: impl IntoIterator<Item = (i64, String)>, after: i64) -> (Vec<String>, i64) {
    let mut last = after;
    let mut key_hashes: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (seq, key_hash) in rows {
        last = last.max(seq);
        if seen.insert(key_hash.clone()) {
            key_hashes.push(key_hash);
        }
    }
    (key_hashes, last)
}
