//! Where keys live: a SQLite database. Only a key's hash is stored, never the key.
//!
//! Every change to a key appends its hash to the change log (`changes`) in the same
//! transaction, and every admin change an event to the audit log. Write transactions take
//! the database's write lock first (`BEGIN IMMEDIATE`), so they commit one at a time in
//! the order of their change log numbers: a poll that has read up to number N can never
//! later meet a change numbered below N (the change feed's promise, CONTRACT "Change
//! feed"). AUTOINCREMENT keeps numbers from being reused after old changes are pruned.
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Mutex;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    revoked_at INTEGER,
    rotated_from TEXT,
    rotated_to TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_owner ON keys (json_extract(record, '$.owner'), key_id);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_hash TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT NOT NULL,
    changes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_key ON audit (key_id, id);
CREATE TABLE IF NOT EXISTS admin_tokens (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

#[derive(Debug)]
pub enum StoreError {
    NotFound,
    Conflict(String),
    Db(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Db(e.to_string())
    }
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
    /// The hashes changed after the cursor (at most the limit), and the cursor after them.
    Listed { key_hashes: Vec<String>, last: i64 },
    /// Changes after the cursor were pruned: the feed must start again.
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

pub struct Store {
    conn: Mutex<Connection>,
}

const KEY_COLUMNS: &str =
    "key_id, key_hash, name, record, created_at, updated_at, revoked_at, rotated_from, rotated_to";

fn key_row(row: &rusqlite::Row) -> rusqlite::Result<KeyRow> {
    let record: String = row.get(3)?;
    let record = match serde_json::from_str(&record) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    Ok(KeyRow {
        key_id: row.get(0)?,
        key_hash: row.get(1)?,
        name: row.get(2)?,
        record,
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
        revoked_at: row.get(6)?,
        rotated_from: row.get(7)?,
        rotated_to: row.get(8)?,
    })
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Store> {
        let conn = Connection::open(path)?;
        // WAL: lookups read while a write commits; a write that returned is on disk.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> StoreResult<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| StoreError::Db("the database lock is poisoned".into()))
    }

    /// Runs `f` in a write transaction, committed when it returns `Ok`.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Transaction) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let done = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(done)
    }

    pub fn key_by_id(&self, key_id: &str) -> StoreResult<KeyRow> {
        key_by(&*self.conn()?, "key_id", key_id)
    }

    /// The record the filter gets for `key_hash` (None: no such key).
    pub fn record_by_hash(&self, key_hash: &str) -> StoreResult<Option<String>> {
        let conn = self.conn()?;
        let record = conn
            .query_row(
                "SELECT record FROM keys WHERE key_hash = ?1",
                [key_hash],
                |row| row.get(0),
            )
            .optional()?;
        Ok(record)
    }

    /// Keys in `key_id` order after `after`, of `owner` if given.
    pub fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<KeyRow>> {
        let conn = self.conn()?;
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE (?1 IS NULL OR json_extract(record, '$.owner') = ?1)
             AND (?2 IS NULL OR key_id > ?2) ORDER BY key_id LIMIT ?3"
        );
        let mut statement = conn.prepare(&sql)?;
        let rows = statement.query_map(params![owner, after, limit], key_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The change log after number `after` (None: where it stands), at most `limit`.
    pub fn changes(&self, after: Option<i64>, limit: u32) -> StoreResult<Changes> {
        let conn = self.conn()?;
        let head: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
            r.get(0)
        })?;
        let head = head.max(meta(&conn, "pruned_through")?);
        let Some(after) = after else {
            return Ok(Changes::Listed {
                key_hashes: Vec::new(),
                last: head,
            });
        };
        if after < meta(&conn, "pruned_through")? || after > head {
            return Ok(Changes::Gone);
        }
        let mut statement =
            conn.prepare("SELECT seq, key_hash FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = statement.query_map(params![after, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut last = after;
        let mut key_hashes: Vec<String> = Vec::new();
        for row in rows {
            let (seq, key_hash) = row?;
            last = seq;
            if !key_hashes.contains(&key_hash) {
                key_hashes.push(key_hash);
            }
        }
        Ok(Changes::Listed { key_hashes, last })
    }

    /// Forgets changes made before `before` (Unix seconds); polls from before them get 410.
    pub fn prune_changes(&self, before: i64) -> StoreResult<usize> {
        self.write(|tx| -> StoreResult<usize> {
            let through: Option<i64> = tx.query_row(
                "SELECT MAX(seq) FROM changes WHERE at < ?1",
                [before],
                |r| r.get(0),
            )?;
            let Some(through) = through else {
                return Ok(0);
            };
            let pruned = tx.execute("DELETE FROM changes WHERE seq <= ?1", [through])?;
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ('pruned_through', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = MAX(value, ?1)",
                [through],
            )?;
            Ok(pruned)
        })
    }

    pub fn audit(
        &self,
        key_id: Option<&str>,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEvent>> {
        let conn = self.conn()?;
        let mut statement = conn.prepare(
            "SELECT id, at, actor, action, key_id, changes FROM audit
             WHERE (?1 IS NULL OR key_id = ?1) AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = statement.query_map(params![key_id, after, limit], |r| {
            let changes: String = r.get(5)?;
            Ok(AuditEvent {
                id: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                key_id: r.get(4)?,
                changes: serde_json::from_str(&changes).unwrap_or(Value::Null),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The name of the admin token with hash `token_hash`, unless revoked.
    pub fn admin_token_name(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let conn = self.conn()?;
        Ok(conn
            .query_row(
                "SELECT name FROM admin_tokens WHERE token_hash = ?1 AND revoked_at IS NULL",
                [token_hash],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn add_admin_token(&self, name: &str, token_hash: &str, now: i64) -> StoreResult<()> {
        self.write(|tx| {
            let added = tx.execute(
                "INSERT INTO admin_tokens (name, token_hash, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
                params![name, token_hash, now],
            )?;
            match added {
                0 => Err(StoreError::Conflict(format!("a token named {name} exists"))),
                _ => Ok(()),
            }
        })
    }

    /// Admin tokens: name, created, revoked.
    pub fn admin_tokens(&self) -> StoreResult<Vec<(String, i64, Option<i64>)>> {
        let conn = self.conn()?;
        let mut statement =
            conn.prepare("SELECT name, created_at, revoked_at FROM admin_tokens ORDER BY name")?;
        let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn revoke_admin_token(&self, name: &str, now: i64) -> StoreResult<()> {
        self.write(|tx| {
            let revoked = tx.execute(
                "UPDATE admin_tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                params![name, now],
            )?;
            match revoked {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
    }
}

fn meta(conn: &Connection, name: &str) -> StoreResult<i64> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

fn key_by(conn: &Connection, column: &str, value: &str) -> StoreResult<KeyRow> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE {column} = ?1");
    conn.query_row(&sql, [value], key_row)
        .optional()?
        .ok_or(StoreError::NotFound)
}

/// Writes within a transaction: each keeps the change log and the audit log with it.
pub trait Writes {
    fn key(&self, key_id: &str) -> StoreResult<KeyRow>;
    fn insert_key(&self, row: &KeyRow) -> StoreResult<()>;
    fn update_key(&self, row: &KeyRow) -> StoreResult<()>;
    fn delete_key(&self, key_id: &str) -> StoreResult<()>;
    fn log_change(&self, key_hash: &str, at: i64) -> StoreResult<()>;
    fn log_event(&self, at: i64, event: &Event) -> StoreResult<()>;
}

impl Writes for Transaction<'_> {
    fn key(&self, key_id: &str) -> StoreResult<KeyRow> {
        key_by(self, "key_id", key_id)
    }

    fn insert_key(&self, row: &KeyRow) -> StoreResult<()> {
        let record = Value::Object(row.record.clone()).to_string();
        let inserted = self.execute(
            &format!(
                "INSERT INTO keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT DO NOTHING"
            ),
            params![
                row.key_id,
                row.key_hash,
                row.name,
                record,
                row.created_at,
                row.updated_at,
                row.revoked_at,
                row.rotated_from,
                row.rotated_to
            ],
        )?;
        match inserted {
            0 => Err(StoreError::Conflict("the key exists".into())),
            _ => Ok(()),
        }
    }

    fn update_key(&self, row: &KeyRow) -> StoreResult<()> {
        let record = Value::Object(row.record.clone()).to_string();
        let updated = self.execute(
            "UPDATE keys SET name = ?2, record = ?3, updated_at = ?4, revoked_at = ?5,
             rotated_from = ?6, rotated_to = ?7 WHERE key_id = ?1",
            params![
                row.key_id,
                row.name,
                record,
                row.updated_at,
                row.revoked_at,
                row.rotated_from,
                row.rotated_to
            ],
        )?;
        match updated {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    fn delete_key(&self, key_id: &str) -> StoreResult<()> {
        match self.execute("DELETE FROM keys WHERE key_id = ?1", [key_id])? {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    fn log_change(&self, key_hash: &str, at: i64) -> StoreResult<()> {
        self.execute(
            "INSERT INTO changes (key_hash, at) VALUES (?1, ?2)",
            params![key_hash, at],
        )?;
        Ok(())
    }

    fn log_event(&self, at: i64, event: &Event) -> StoreResult<()> {
        self.execute(
            "INSERT INTO audit (at, actor, action, key_id, changes) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                at,
                event.actor,
                event.action,
                event.key_id,
                event.changes.to_string()
            ],
        )?;
        Ok(())
    }
}
