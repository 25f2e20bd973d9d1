//! The admin API from the command line: `keys create|list|show|update|revoke|rotate|delete`
//! and `audit`, against a running service (`--url`, the admin listener), with the admin
//! token from `APIKEY_ADMIN_TOKEN`. Each prints the API's JSON answer; an error answer goes
//! to standard error, and the command exits 1.
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

#[derive(Args)]
pub struct Target {
    /// The admin listener.
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    url: String,
    /// The admin token.
    #[arg(long, env = "APIKEY_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Args)]
pub struct RecordFields {
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    name: Option<String>,
    /// A scope the key grants (repeat for several).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Unix seconds.
    #[arg(long)]
    expires_at: Option<i64>,
    /// More fields of the call's body, as a JSON object (e.g. rate_limit, quotas,
    /// allowed_cidrs); the flags above win.
    #[arg(long)]
    json: Option<String>,
}

#[derive(Subcommand)]
pub enum KeyCall {
    /// Makes a key; the answer holds the key, shown this once.
    Create {
        #[command(flatten)]
        fields: RecordFields,
        /// One of the service's --key-prefixes.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    List {
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    Show {
        key_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Sets record fields (and the name) of a key.
    Update {
        key_id: String,
        #[command(flatten)]
        fields: RecordFields,
        #[command(flatten)]
        target: Target,
    },
    Revoke {
        key_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// A new key with the old one's record; the old one works for --grace-s more.
    Rotate {
        key_id: String,
        #[arg(long)]
        grace_s: Option<i64>,
        #[command(flatten)]
        target: Target,
    },
    Delete {
        key_id: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args)]
pub struct AuditCall {
    #[arg(long)]
    key_id: Option<String>,
    #[arg(long)]
    limit: Option<u32>,
    #[arg(long)]
    after: Option<i64>,
    #[command(flatten)]
    target: Target,
}

impl RecordFields {
    fn body(self) -> Result<Map<String, Value>, String> {
        let mut body = match self.json.as_deref().map(serde_json::from_str::<Value>) {
            None => Map::new(),
            Some(Ok(Value::Object(fields))) => fields,
            Some(_) => return Err("--json: not a JSON object".into()),
        };
        let mut set = |name: &str, value: Option<Value>| {
            if let Some(value) = value {
                body.insert(name.into(), value);
            }
        };
        set("owner", self.owner.map(Value::from));
        set("name", self.name.map(Value::from));
        set("expires_at", self.expires_at.map(Value::from));
        set(
            "scopes",
            Some(self.scopes)
                .filter(|s| !s.is_empty())
                .map(|s| json!(s)),
        );
        Ok(body)
    }
}

/// `name=value` pairs of a query, the unset ones left out.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let set: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={}", encode(v))))
        .collect();
    match set.is_empty() {
        true => String::new(),
        false => format!("?{}", set.join("&")),
    }
}

/// Percent-encodes what is not unreserved in a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn keys(call: KeyCall) -> Result<(), String> {
    let (method, path, body, target) = match call {
        KeyCall::Create {
            fields,
            prefix,
            target,
        } => {
            let mut body = fields.body()?;
            if let Some(prefix) = prefix {
                body.insert("prefix".into(), prefix.into());
            }
            ("POST", "/keys".to_string(), Some(body), target)
        }
        KeyCall::List {
            owner,
            limit,
            after,
            target,
        } => {
            let q = query(&[
                ("owner", owner),
                ("limit", limit.map(|l| l.to_string())),
                ("after", after),
            ]);
            ("GET", format!("/keys{q}"), None, target)
        }
        KeyCall::Show { key_id, target } => {
            ("GET", format!("/keys/{}", encode(&key_id)), None, target)
        }
        KeyCall::Update {
            key_id,
            fields,
            target,
        } => {
            let body = fields.body()?;
            (
                "PATCH",
                format!("/keys/{}", encode(&key_id)),
                Some(body),
                target,
            )
        }
        KeyCall::Revoke { key_id, target } => {
            let path = format!("/keys/{}/revoke", encode(&key_id));
            ("POST", path, None, target)
        }
        KeyCall::Rotate {
            key_id,
            grace_s,
            target,
        } => {
            let mut body = Map::new();
            if let Some(grace_s) = grace_s {
                body.insert("grace_s".into(), grace_s.into());
            }
            let path = format!("/keys/{}/rotate", encode(&key_id));
            ("POST", path, Some(body), target)
        }
        KeyCall::Delete { key_id, target } => {
            ("DELETE", format!("/keys/{}", encode(&key_id)), None, target)
        }
    };
    call_api(&target, method, &path, body)
}

pub fn audit(call: AuditCall) -> Result<(), String> {
    let q = query(&[
        ("key_id", call.key_id),
        ("limit", call.limit.map(|l| l.to_string())),
        ("after", call.after.map(|a| a.to_string())),
    ]);
    call_api(&call.target, "GET", &format!("/audit{q}"), None)
}

/// One admin call: its answer on standard output, or its error.
fn call_api(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Map<String, Value>>,
) -> Result<(), String> {
    let url = format!("{}/admin/v1{path}", target.url.trim_end_matches('/'));
    let request = ureq::request(method, &url)
        .set("authorization", &format!("Bearer {}", target.token))
        .timeout(std::time::Duration::from_secs(30));
    let answered = match body {
        Some(body) => request.send_json(Value::Object(body)),
        None => request.call(),
    };
    match answered {
        Ok(response) => {
            let text = response.into_string().map_err(|e| e.to_string())?;
            if !text.is_empty() {
                println!("{text}");
            }
            Ok(())
        }
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().unwrap_or_default();
            Err(format!("{method} {path}: {status} {text}"))
        }
        Err(e) => Err(format!("{url}: {e}")),
    }
}
