//! What the admin API does to keys: each call one transaction that changes the key, lists
//! its hash in the change log and writes the audit event.
use crate::issue::{new_key, new_key_id};
use crate::record::{check, with_changes, InvalidField};
use crate::store::{Event, KeyRow, Store, StoreError};
use serde_json::{json, Map, Value};

/// Why an admin call changed nothing.
#[derive(Debug)]
pub enum Refused {
    Invalid(InvalidField),
    NotFound,
    Conflict(String),
    Failed(String),
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Refused {
        match e {
            StoreError::NotFound => Refused::NotFound,
            StoreError::Conflict(why) => Refused::Conflict(why),
            StoreError::Db(why) => Refused::Failed(why),
        }
    }
}

impl From<InvalidField> for Refused {
    fn from(e: InvalidField) -> Refused {
        Refused::Invalid(e)
    }
}

/// A new key: its row, and the key itself (shown once, to the caller only).
pub struct Issued {
    pub row: KeyRow,
    pub key: String,
}

/// Creates a key with `record` fields and `name`.
pub fn create(
    store: &Store,
    actor: &str,
    now: i64,
    prefix: &str,
    name: &str,
    changes: &Map<String, Value>,
) -> Result<Issued, Refused> {
    let failed = |e: getrandom::Error| Refused::Failed(e.to_string());
    let key_id = new_key_id().map_err(failed)?;
    let record = with_changes(&key_id, &Map::new(), changes)?;
    let (key, key_hash) = new_key(prefix).map_err(failed)?;
    let row = KeyRow {
        key_id,
        key_hash,
        name: name.into(),
        record,
        created_at: now,
        updated_at: now,
        revoked_at: None,
        rotated_from: None,
        rotated_to: None,
    };
    store.write(|tx| -> Result<_, Refused> {
        tx.insert_key(&row)?;
        tx.log_change(&row.key_hash, now)?;
        let mut created = row.record.clone();
        created.insert("name".into(), name.into());
        Ok(tx.log_event(
            now,
            &event(actor, "create", &row.key_id, Value::Object(created)),
        )?)
    })?;
    Ok(Issued { row, key })
}

/// Takes in a key made elsewhere, by its hash, with its record (`key_id` included): a key
/// service being replaced by this one keeps its keys. False: a key with that hash or
/// `key_id` is here already (an import run again changes nothing).
pub fn import(
    store: &Store,
    actor: &str,
    now: i64,
    key_hash: &str,
    record: &Map<String, Value>,
) -> Result<bool, Refused> {
    let is_hash = key_hash.len() == 64
        && key_hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hash {
        return Err(InvalidField::new("key_hash", "must be a lowercase hex SHA-256").into());
    }
    let key_id = match record.get("key_id").and_then(Value::as_str) {
        Some(key_id) if !key_id.is_empty() => key_id.to_string(),
        _ => return Err(InvalidField::new("key_id", "is required").into()),
    };
    check(record)?;
    let revoked = record.get("revoked").and_then(Value::as_bool) == Some(true);
    let row = KeyRow {
        key_id: key_id.clone(),
        key_hash: key_hash.into(),
        name: String::new(),
        record: record.clone(),
        created_at: now,
        updated_at: now,
        revoked_at: revoked.then_some(now),
        rotated_from: None,
        rotated_to: None,
    };
    store.write(|tx| -> Result<_, Refused> {
        match tx.insert_key(&row) {
            Err(StoreError::Conflict(_)) => return Ok(false),
            done => done?,
        }
        tx.log_change(key_hash, now)?;
        let imported = Value::Object(record.clone());
        tx.log_event(now, &event(actor, "import", &key_id, imported))?;
        Ok(true)
    })
}

/// Sets record fields (and `name`) of a key.
pub fn update(
    store: &Store,
    actor: &str,
    now: i64,
    key_id: &str,
    name: Option<&str>,
    changes: &Map<String, Value>,
) -> Result<KeyRow, Refused> {
    store.write(|tx| -> Result<_, Refused> {
        let mut row = tx.key(key_id)?;
        row.record = with_changes(key_id, &row.record, changes)?;
        if let Some(name) = name {
            row.name = name.into();
        }
        row.updated_at = now;
        tx.update_key(&row)?;
        tx.log_change(&row.key_hash, now)?;
        let mut changed = changes.clone();
        if let Some(name) = name {
            changed.insert("name".into(), name.into());
        }
        tx.log_event(now, &event(actor, "update", key_id, Value::Object(changed)))?;
        Ok(row)
    })
}

/// Revokes a key: every filter refuses it within its feed interval.
pub fn revoke(store: &Store, actor: &str, now: i64, key_id: &str) -> Result<KeyRow, Refused> {
    store.write(|tx| -> Result<_, Refused> {
        let mut row = tx.key(key_id)?;
        if row.revoked_at.is_none() {
            row.record.insert("revoked".into(), Value::Bool(true));
            row.revoked_at = Some(now);
            row.updated_at = now;
            tx.update_key(&row)?;
            tx.log_change(&row.key_hash, now)?;
            tx.log_event(
                now,
                &event(actor, "revoke", key_id, json!({"revoked": true})),
            )?;
        }
        Ok(row)
    })
}

/// Issues a new key with the old one's record; the old one works until `grace_s` from
/// now (or its own expiry, if earlier). Also the old key's hash (its record changed).
pub fn rotate(
    store: &Store,
    actor: &str,
    now: i64,
    key_id: &str,
    grace_s: i64,
    prefix: &str,
) -> Result<(Issued, String), Refused> {
    let failed = |e: getrandom::Error| Refused::Failed(e.to_string());
    let new_id = new_key_id().map_err(failed)?;
    let (key, key_hash) = new_key(prefix).map_err(failed)?;
    let row = store.write(|tx| -> Result<_, Refused> {
        let mut old = tx.key(key_id)?;
        if old.revoked_at.is_some() {
            return Err(Refused::Conflict("a revoked key cannot be rotated".into()));
        }
        if let Some(to) = &old.rotated_to {
            return Err(Refused::Conflict(format!("already rotated to {to}")));
        }
        let mut record = old.record.clone();
        record.insert("key_id".into(), Value::String(new_id.clone()));
        let new = KeyRow {
            key_id: new_id.clone(),
            key_hash: key_hash.clone(),
            name: old.name.clone(),
            record,
            created_at: now,
            updated_at: now,
            revoked_at: None,
            rotated_from: Some(old.key_id.clone()),
            rotated_to: None,
        };
        let deadline = now.saturating_add(grace_s.max(0));
        let expires_at = match old.record.get("expires_at").and_then(Value::as_i64) {
            Some(own) => own.min(deadline),
            None => deadline,
        };
        old.record.insert("expires_at".into(), expires_at.into());
        old.rotated_to = Some(new_id.clone());
        old.updated_at = now;
        tx.update_key(&old)?;
        tx.insert_key(&new)?;
        tx.log_change(&old.key_hash, now)?;
        tx.log_change(&new.key_hash, now)?;
        let changes = json!({"rotated_to": new_id, "expires_at": expires_at, "grace_s": grace_s});
        tx.log_event(now, &event(actor, "rotate", key_id, changes))?;
        Ok((new, old.key_hash))
    })?;
    Ok((Issued { row: row.0, key }, row.1))
}

/// Deletes a key: lookups then answer 404. Its hash.
pub fn delete(store: &Store, actor: &str, now: i64, key_id: &str) -> Result<String, Refused> {
    store.write(|tx| -> Result<_, Refused> {
        let row = tx.key(key_id)?;
        tx.delete_key(key_id)?;
        tx.log_change(&row.key_hash, now)?;
        tx.log_event(now, &event(actor, "delete", key_id, json!({})))?;
        Ok(row.key_hash)
    })
}

fn event<'a>(actor: &'a str, action: &'a str, key_id: &'a str, changes: Value) -> Event<'a> {
    Event {
        actor,
        action,
        key_id,
        changes,
    }
}

/// The admin API's view of a key: its record and what the service knows of it.
pub fn view(row: &KeyRow) -> Value {
    let mut view = row.record.clone();
    view.entry("revoked").or_insert(Value::Bool(false));
    for (field, value) in [
        ("name", json!(row.name)),
        ("key_hash", json!(row.key_hash)),
        ("created_at", json!(row.created_at)),
        ("updated_at", json!(row.updated_at)),
        ("revoked_at", json!(row.revoked_at)),
        ("rotated_from", json!(row.rotated_from)),
        ("rotated_to", json!(row.rotated_to)),
        ("last_used_at", Value::Null),
    ] {
        view.insert(field.into(), value);
    }
    Value::Object(view)
}
