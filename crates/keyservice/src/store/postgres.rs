//! The store on PostgreSQL, for fleets: any number of `serve` processes on one database act
//! as one key service. Write transactions take one transaction-level advisory lock first,
//! so that they commit in the order of their change numbers; times that processes compare
//! (their reports) are the database's clock, not theirs.
use super::{
    listed, record_of, schema, AuditEvent, Changes, Event, KeyRow, StoreError, StoreResult, Writes,
    KEY_COLUMNS, PROCESS_LIVE_MS,
};
use postgres::{Client, NoTls, Row, Statement, Transaction};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;

/// The advisory locks this service takes: one for creating the schema, one for writing.
const SCHEMA_LOCK: i64 = 0x61_706b_6b73_0001;
const WRITE_LOCK: i64 = 0x61_706b_6b73_0002;
/// Connections kept open between calls, at most: as many as the service makes calls at once
/// (`service::MAX_DATABASE_CALLS`, and the change log's reader).
const MAX_IDLE: usize = 17;
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

pub struct Postgres {
    url: String,
    idle: Mutex<Vec<Connection>>,
}

/// A pooled connection, with the statements it has prepared: a lookup is then one round
/// trip to the database instead of two (prepare, then run).
struct Connection {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Connection {
    /// `sql`, prepared once on this connection.
    fn statement(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }
}

impl std::ops::Deref for Connection {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        StoreError::Db(e.to_string())
    }
}

fn key_row(row: &Row) -> Result<KeyRow, postgres::Error> {
    let record: String = row.try_get(3)?;
    Ok(KeyRow {
        key_id: row.try_get(0)?,
        key_hash: row.try_get(1)?,
        name: row.try_get(2)?,
        record: record_of(&record),
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
        revoked_at: row.try_get(6)?,
        rotated_from: row.try_get(7)?,
        rotated_to: row.try_get(8)?,
    })
}

impl Postgres {
    pub fn open(url: &str) -> StoreResult<Postgres> {
        let db = Postgres {
            url: url.to_string(),
            idle: Mutex::new(Vec::new()),
        };
        db.with(|client| -> StoreResult<()> {
            // Two processes starting at once must not both create the tables.
            let tables = schema("BIGSERIAL PRIMARY KEY");
            Ok(client.batch_execute(&format!(
                "SELECT pg_advisory_lock({SCHEMA_LOCK}); {tables} SELECT pg_advisory_unlock({SCHEMA_LOCK});"
            ))?)
        })?;
        Ok(db)
    }

    /// Runs `f` on a pooled connection; a connection that broke is not kept.
    fn with<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut client = match pooled {
            Some(client) => client,
            None => Connection {
                client: Client::connect(&self.url, NoTls).map_err(StoreError::from)?,
                prepared: HashMap::new(),
            },
        };
        let done = f(&mut client);
        if !client.is_closed() {
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < MAX_IDLE {
                    idle.push(client);
                }
            }
        }
        done
    }

    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut dyn Writes) -> Result<T, E>,
    ) -> Result<T, E> {
        self.with(|client| {
            let mut tx = client.transaction().map_err(StoreError::from)?;
            // Held to the commit: writers commit in the order of their change numbers.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .map_err(StoreError::from)?;
            let done = f(&mut tx)?;
            tx.commit().map_err(StoreError::from)?;
            Ok(done)
        })
    }

    pub fn key_by_id(&self, key_id: &str) -> StoreResult<KeyRow> {
        self.with(|connection| key_by_id(&mut connection.client, key_id))
    }

    pub fn record_by_hash(&self, key_hash: &str) -> StoreResult<Option<String>> {
        self.with(|client| {
            let lookup = client.statement("SELECT record FROM keys WHERE key_hash = $1")?;
            let row = client.query_opt(&lookup, &[&key_hash])?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    pub fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<KeyRow>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE ($1::text IS NULL OR owner = $1::text)
             AND ($2::text IS NULL OR key_id > $2::text) ORDER BY key_id LIMIT $3"
        );
        self.with(|client| {
            let rows = client.query(&sql, &[&owner, &after, &i64::from(limit)])?;
            Ok(rows.iter().map(key_row).collect::<Result<_, _>>()?)
        })
    }

    pub fn head(&self) -> StoreResult<i64> {
        self.with(head)
    }

    pub fn changes(&self, after: Option<i64>, limit: u32) -> StoreResult<Changes> {
        self.with(|client| {
            let head = head(client)?;
            let slowest: Option<i64> = client
                .query_one(
                    &format!(
                        "SELECT MIN(through) FROM processes WHERE reported_ms >= {NOW_MS} - $1"
                    ),
                    &[&PROCESS_LIVE_MS],
                )?
                .try_get(0)?;
            let bound = slowest.map_or(head, |through| through.min(head));
            let Some(after) = after else {
                return Ok(Changes::Listed {
                    key_hashes: Vec::new(),
                    last: bound,
                });
            };
            if after < meta(client, "pruned_through")? || after > head {
                return Ok(Changes::Gone);
            }
            let (key_hashes, last) = read_log(client, after, bound, limit)?;
            Ok(Changes::Listed { key_hashes, last })
        })
    }

    pub fn tail(&self, after: i64, limit: u32) -> StoreResult<Changes> {
        self.with(|client| {
            if after < meta(client, "pruned_through")? {
                return Ok(Changes::Gone);
            }
            let (key_hashes, last) = read_log(client, after, i64::MAX, limit)?;
            Ok(Changes::Listed { key_hashes, last })
        })
    }

    pub fn report_process(&self, process: &str, through: i64) -> StoreResult<()> {
        self.with(|client| {
            client.execute(
                &format!(
                    "INSERT INTO processes (process, through, reported_ms) VALUES ($1, $2, {NOW_MS})
                     ON CONFLICT (process) DO UPDATE SET through = $2, reported_ms = {NOW_MS}"
                ),
                &[&process, &through],
            )?;
            Ok(())
        })
    }

    pub fn prune_changes(&self, before: i64) -> StoreResult<usize> {
        self.with(|client| {
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
            tx.execute(
                &format!("DELETE FROM processes WHERE reported_ms < {NOW_MS} - 86400000"),
                &[],
            )?;
            let through: Option<i64> = tx
                .query_one("SELECT MAX(seq) FROM changes WHERE at < $1", &[&before])?
                .try_get(0)?;
            let pruned = match through {
                None => 0,
                Some(through) => {
                    tx.execute(
                        "INSERT INTO meta (name, value) VALUES ('pruned_through', $1)
                         ON CONFLICT (name) DO UPDATE SET value = GREATEST(meta.value, $1)",
                        &[&through],
                    )?;
                    tx.execute("DELETE FROM changes WHERE seq <= $1", &[&through])?
                }
            };
            tx.commit()?;
            Ok(pruned as usize)
        })
    }

    pub fn audit(
        &self,
        key_id: Option<&str>,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEvent>> {
        self.with(|client| {
            let rows = client.query(
                "SELECT id, at, actor, action, key_id, changes FROM audit
                 WHERE ($1::text IS NULL OR key_id = $1::text) AND ($2::bigint IS NULL OR id > $2::bigint)
                 ORDER BY id LIMIT $3",
                &[&key_id, &after, &i64::from(limit)],
            )?;
            let event = |r: &Row| -> Result<AuditEvent, postgres::Error> {
                let changes: String = r.try_get(5)?;
                Ok(AuditEvent {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    action: r.try_get(3)?,
                    key_id: r.try_get(4)?,
                    changes: serde_json::from_str(&changes).unwrap_or(Value::Null),
                })
            };
            Ok(rows.iter().map(event).collect::<Result<_, _>>()?)
        })
    }

    pub fn admin_token_name(&self, token_hash: &str) -> StoreResult<Option<String>> {
        self.with(|client| {
            let row = client.query_opt(
                "SELECT name FROM admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
                &[&token_hash],
            )?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    pub fn add_admin_token(&self, name: &str, token_hash: &str, now: i64) -> StoreResult<()> {
        self.with(|client| {
            let added = client.execute(
                "INSERT INTO admin_tokens (name, token_hash, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &token_hash, &now],
            )?;
            match added {
                0 => Err(StoreError::Conflict(format!("a token named {name} exists"))),
                _ => Ok(()),
            }
        })
    }

    pub fn admin_tokens(&self) -> StoreResult<Vec<(String, i64, Option<i64>)>> {
        self.with(|client| {
            let rows = client.query(
                "SELECT name, created_at, revoked_at FROM admin_tokens ORDER BY name",
                &[],
            )?;
            let token = |r: &Row| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
            Ok(rows
                .iter()
                .map(token)
                .collect::<Result<_, postgres::Error>>()?)
        })
    }

    pub fn revoke_admin_token(&self, name: &str, now: i64) -> StoreResult<()> {
        self.with(|client| {
            let revoked = client.execute(
                "UPDATE admin_tokens SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
                &[&name, &now],
            )?;
            match revoked {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
    }
}

fn head(client: &mut Connection) -> StoreResult<i64> {
    let newest = client.statement("SELECT COALESCE(MAX(seq), 0)::bigint FROM changes")?;
    let newest: i64 = client.query_one(&newest, &[])?.try_get(0)?;
    Ok(newest.max(meta(client, "pruned_through")?))
}

fn read_log(
    client: &mut Connection,
    after: i64,
    bound: i64,
    limit: u32,
) -> StoreResult<(Vec<String>, i64)> {
    let log = client.statement(
        "SELECT seq, key_hash FROM changes WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
    )?;
    let rows = client.query(&log, &[&after, &bound, &i64::from(limit)])?;
    let rows = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(i64, String)>, postgres::Error>>()?;
    Ok(listed(rows, after))
}

fn meta(client: &mut Connection, name: &str) -> StoreResult<i64> {
    let value = client.statement("SELECT value FROM meta WHERE name = $1")?;
    let row = client.query_opt(&value, &[&name])?;
    Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0))
}

fn key_by_id(client: &mut impl postgres::GenericClient, key_id: &str) -> StoreResult<KeyRow> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_id = $1");
    let row = client.query_opt(&sql, &[&key_id])?;
    match row {
        Some(row) => Ok(key_row(&row)?),
        None => Err(StoreError::NotFound),
    }
}

impl Writes for Transaction<'_> {
    fn key(&mut self, key_id: &str) -> StoreResult<KeyRow> {
        key_by_id(self, key_id)
    }

    fn insert_key(&mut self, row: &KeyRow) -> StoreResult<()> {
        let inserted = self.execute(
            "INSERT INTO keys (key_id, key_hash, owner, name, record, created_at, updated_at,
             revoked_at, rotated_from, rotated_to) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT DO NOTHING",
            &[
                &row.key_id,
                &row.key_hash,
                &row.owner(),
                &row.name,
                &row.record_text(),
                &row.created_at,
                &row.updated_at,
                &row.revoked_at,
                &row.rotated_from,
                &row.rotated_to,
            ],
        )?;
        match inserted {
            0 => Err(StoreError::Conflict("the key exists".into())),
            _ => Ok(()),
        }
    }

    fn update_key(&mut self, row: &KeyRow) -> StoreResult<()> {
        let updated = self.execute(
            "UPDATE keys SET owner = $2, name = $3, record = $4, updated_at = $5, revoked_at = $6,
             rotated_from = $7, rotated_to = $8 WHERE key_id = $1",
            &[
                &row.key_id,
                &row.owner(),
                &row.name,
                &row.record_text(),
                &row.updated_at,
                &row.revoked_at,
                &row.rotated_from,
                &row.rotated_to,
            ],
        )?;
        match updated {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    fn delete_key(&mut self, key_id: &str) -> StoreResult<()> {
        match self.execute("DELETE FROM keys WHERE key_id = $1", &[&key_id])? {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    fn log_change(&mut self, key_hash: &str, at: i64) -> StoreResult<()> {
        self.execute(
            "INSERT INTO changes (key_hash, at) VALUES ($1, $2)",
            &[&key_hash, &at],
        )?;
        Ok(())
    }

    fn log_event(&mut self, at: i64, event: &Event) -> StoreResult<()> {
        self.execute(
            "INSERT INTO audit (at, actor, action, key_id, changes) VALUES ($1, $2, $3, $4, $5)",
            &[
                &at,
                &event.actor,
                &event.action,
                &event.key_id,
                &event.changes.to_string(),
            ],
        )?;
        Ok(())
    }
}
