//! The store on SQLite: one file, WAL, every write on disk before it is answered.
//! AUTOINCREMENT keeps change numbers from being reused after old changes are pruned.
use super::{
    listed, record_of, schema, AuditEvent, Changes, Event, KeyRow, StoreError, StoreResult, Writes,
    KEY_COLUMNS, PROCESS_LIVE_MS,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::Value;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

pub struct Sqlite {
    conn: Mutex<Connection>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Db(e.to_string())
    }
}

fn key_row(row: &rusqlite::Row) -> rusqlite::Result<KeyRow> {
    let record: String = row.get(3)?;
    Ok(KeyRow {
        key_id: row.get(0)?,
        key_hash: row.get(1)?,
        name: row.get(2)?,
        record: record_of(&record),
        created_at: row.get(4)?,
        updated_at: row.get(5)?,
        revoked_at: row.get(6)?,
        rotated_from: row.get(7)?,
        rotated_to: row.get(8)?,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Sqlite {
    pub fn open(path: &Path) -> StoreResult<Sqlite> {
        let conn = Connection::open(path)?;
        // WAL: lookups read while a write commits; a write that returned is on disk.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(&schema("INTEGER PRIMARY KEY AUTOINCREMENT"))?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> StoreResult<MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| StoreError::Db("the database lock is poisoned".into()))
    }

    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut dyn Writes) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.conn()?;
        // IMMEDIATE: the write lock first, held to the commit (the feed's order).
        let mut tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let done = f(&mut tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(done)
    }

    pub fn key_by_id(&self, key_id: &str) -> StoreResult<KeyRow> {
        key_by_id(&*self.conn()?, key_id)
    }

    pub fn record_by_hash(&self, key_hash: &str) -> StoreResult<Option<String>> {
        let sql = "SELECT record FROM keys WHERE key_hash = ?1";
        Ok(self
            .conn()?
            .query_row(sql, [key_hash], |row| row.get(0))
            .optional()?)
    }

    pub fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<KeyRow>> {
        let conn = self.conn()?;
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE (?1 IS NULL OR owner = ?1)
             AND (?2 IS NULL OR key_id > ?2) ORDER BY key_id LIMIT ?3"
        );
        let mut statement = conn.prepare(&sql)?;
        let rows = statement.query_map(params![owner, after, limit], key_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn head(&self) -> StoreResult<i64> {
        head(&*self.conn()?)
    }

    pub fn changes(&self, after: Option<i64>, limit: u32) -> StoreResult<Changes> {
        let conn = self.conn()?;
        let head = head(&conn)?;
        let live_since = now_ms() - PROCESS_LIVE_MS;
        let slowest: Option<i64> = conn.query_row(
            "SELECT MIN(through) FROM processes WHERE reported_ms >= ?1",
            [live_since],
            |r| r.get(0),
        )?;
        let bound = slowest.map_or(head, |through| through.min(head));
        let Some(after) = after else {
            return Ok(Changes::Listed {
                key_hashes: Vec::new(),
                last: bound,
            });
        };
        if after < meta(&conn, "pruned_through")? || after > head {
            return Ok(Changes::Gone);
        }
        let (key_hashes, last) = read_log(&conn, after, bound, limit)?;
        Ok(Changes::Listed { key_hashes, last })
    }

    pub fn tail(&self, after: i64, limit: u32) -> StoreResult<Changes> {
        let conn = self.conn()?;
        if after < meta(&conn, "pruned_through")? {
            return Ok(Changes::Gone);
        }
        let (key_hashes, last) = read_log(&conn, after, i64::MAX, limit)?;
        Ok(Changes::Listed { key_hashes, last })
    }

    pub fn report_process(&self, process: &str, through: i64) -> StoreResult<()> {
        self.conn()?.execute(
            "INSERT INTO processes (process, through, reported_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (process) DO UPDATE SET through = ?2, reported_ms = ?3",
            params![process, through, now_ms()],
        )?;
        Ok(())
    }

    pub fn prune_changes(&self, before: i64) -> StoreResult<usize> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pruned = {
            // Processes gone for a day leave the table.
            tx.execute(
                "DELETE FROM processes WHERE reported_ms < ?1",
                [now_ms() - 86_400_000],
            )?;
            let through: Option<i64> = tx.query_row(
                "SELECT MAX(seq) FROM changes WHERE at < ?1",
                [before],
                |r| r.get(0),
            )?;
            match through {
                None => 0,
                Some(through) => {
                    tx.execute(
                        "INSERT INTO meta (name, value) VALUES ('pruned_through', ?1)
                         ON CONFLICT (name) DO UPDATE SET value = MAX(value, ?1)",
                        [through],
                    )?;
                    tx.execute("DELETE FROM changes WHERE seq <= ?1", [through])?
                }
            }
        };
        tx.commit()?;
        Ok(pruned)
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

    pub fn admin_token_name(&self, token_hash: &str) -> StoreResult<Option<String>> {
        let sql = "SELECT name FROM admin_tokens WHERE token_hash = ?1 AND revoked_at IS NULL";
        Ok(self
            .conn()?
            .query_row(sql, [token_hash], |r| r.get(0))
            .optional()?)
    }

    pub fn add_admin_token(&self, name: &str, token_hash: &str, now: i64) -> StoreResult<()> {
        let added = self.conn()?.execute(
            "INSERT INTO admin_tokens (name, token_hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO NOTHING",
            params![name, token_hash, now],
        )?;
        match added {
            0 => Err(StoreError::Conflict(format!("a token named {name} exists"))),
            _ => Ok(()),
        }
    }

    pub fn admin_tokens(&self) -> StoreResult<Vec<(String, i64, Option<i64>)>> {
        let conn = self.conn()?;
        let mut statement =
            conn.prepare("SELECT name, created_at, revoked_at FROM admin_tokens ORDER BY name")?;
        let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn revoke_admin_token(&self, name: &str, now: i64) -> StoreResult<()> {
        let revoked = self.conn()?.execute(
            "UPDATE admin_tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
            params![name, now],
        )?;
        match revoked {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }
}

fn head(conn: &Connection) -> StoreResult<i64> {
    let newest: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
        r.get(0)
    })?;
    Ok(newest.max(meta(conn, "pruned_through")?))
}

fn read_log(
    conn: &Connection,
    after: i64,
    bound: i64,
    limit: u32,
) -> StoreResult<(Vec<String>, i64)> {
    let mut statement = conn.prepare(
        "SELECT seq, key_hash FROM changes WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = statement
        .query_map(params![after, bound, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<(i64, String)>, _>>()?;
    Ok(listed(rows, after))
}

fn meta(conn: &Connection, name: &str) -> StoreResult<i64> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

fn key_by_id(conn: &Connection, key_id: &str) -> StoreResult<KeyRow> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ?1");
    conn.query_row(&sql, [key_id], key_row)
        .optional()?
        .ok_or(StoreError::NotFound)
}

impl Writes for Transaction<'_> {
    fn key(&mut self, key_id: &str) -> StoreResult<KeyRow> {
        key_by_id(self, key_id)
    }

    fn insert_key(&mut self, row: &KeyRow) -> StoreResult<()> {
        let inserted = self.execute(
            "INSERT INTO keys (key_id, key_hash, owner, name, record, created_at, updated_at,
             revoked_at, rotated_from, rotated_to) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT DO NOTHING",
            params![
                row.key_id,
                row.key_hash,
                row.owner(),
                row.name,
                row.record_text(),
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

    fn update_key(&mut self, row: &KeyRow) -> StoreResult<()> {
        let updated = self.execute(
            "UPDATE keys SET owner = ?2, name = ?3, record = ?4, updated_at = ?5, revoked_at = ?6,
             rotated_from = ?7, rotated_to = ?8 WHERE key_id = ?1",
            params![
                row.key_id,
                row.owner(),
                row.name,
                row.record_text(),
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

    fn delete_key(&mut self, key_id: &str) -> StoreResult<()> {
        match self.execute("DELETE FROM keys WHERE key_id = ?1", [key_id])? {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    fn log_change(&mut self, key_hash: &str, at: i64) -> StoreResult<()> {
        self.execute(
            "INSERT INTO changes (key_hash, at) VALUES (?1, ?2)",
            params![key_hash, at],
        )?;
        Ok(())
    }

    fn log_event(&mut self, at: i64, event: &Event) -> StoreResult<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Changes, Store};

    fn store() -> (Store, tempfile_dir::Dir) {
        let dir = tempfile_dir::Dir::new();
        let store = Store::open(&format!("sqlite:{}", dir.path("keys.db"))).unwrap();
        (store, dir)
    }

    fn change(store: &Store, hash: &str, at: i64) {
        store
            .write(|tx| -> StoreResult<()> { tx.log_change(hash, at) })
            .unwrap();
    }

    fn listed(store: &Store, after: i64) -> Changes {
        store.changes(Some(after), 100).unwrap()
    }

    #[test]
    fn the_feed_waits_for_every_live_process_and_no_longer_for_a_silent_one() {
        let (store, _dir) = store();
        change(&store, "h1", 10);
        change(&store, "h2", 10);
        let everything = Changes::Listed {
            key_hashes: vec!["h1".into(), "h2".into()],
            last: 2,
        };
        assert_eq!(listed(&store, 0), everything, "no process serves yet");
        store.report_process("a", 2).unwrap();
        store.report_process("b", 1).unwrap();
        let behind_b = Changes::Listed {
            key_hashes: vec!["h1".into()],
            last: 1,
        };
        assert_eq!(listed(&store, 0), behind_b, "b has not forgotten h2 yet");
        assert_eq!(
            store.changes(None, 100).unwrap(),
            Changes::Listed {
                key_hashes: vec![],
                last: 1,
            }
        );
        // b goes silent: past PROCESS_LIVE_MS the feed no longer waits for it.
        let Store::Sqlite(db) = &store else {
            unreachable!()
        };
        let silent = "UPDATE processes SET reported_ms = 0 WHERE process = 'b'";
        db.conn().unwrap().execute(silent, []).unwrap();
        assert_eq!(listed(&store, 0), everything);
    }

    #[test]
    fn a_cursor_from_before_the_pruned_changes_or_never_made_is_gone() {
        let (store, _dir) = store();
        change(&store, "old", 10);
        change(&store, "old", 11);
        change(&store, "new", 1_000);
        assert_eq!(store.prune_changes(500).unwrap(), 2);
        assert_eq!(listed(&store, 0), Changes::Gone);
        assert_eq!(listed(&store, 1), Changes::Gone);
        assert_eq!(
            listed(&store, 2),
            Changes::Listed {
                key_hashes: vec!["new".into()],
                last: 3
            }
        );
        assert_eq!(listed(&store, 4), Changes::Gone, "a cursor it never made");
        // Numbers are never reused once pruned.
        assert_eq!(store.prune_changes(5_000).unwrap(), 1);
        change(&store, "newer", 6_000);
        assert_eq!(
            listed(&store, 3),
            Changes::Listed {
                key_hashes: vec!["newer".into()],
                last: 4
            }
        );
    }
}

/// A temporary folder for tests, removed when dropped.
#[cfg(test)]
mod tempfile_dir {
    pub struct Dir(std::path::PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let path = std::env::temp_dir().join(format!(
                "apikey-keyservice-test-{}-{}",
                std::process::id(),
                crate::issue::new_key_id().unwrap()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
