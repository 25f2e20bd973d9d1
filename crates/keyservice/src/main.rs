//! `apikey-keyservice`: the key service for apikey-filter. `serve` answers the filter's
//! lookups and change feed on one listener and the admin API on another; `admin-token`
//! makes the tokens the admin API takes. See docs/keyservice.md.
mod admin_api;
mod cli;
mod filter_api;
mod issue;
mod keys;
mod lookup_cache;
mod metrics;
mod record;
mod service;
mod store;

use clap::{Parser, Subcommand};
use service::{now, Service};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreError};

#[derive(Parser)]
#[command(
    name = "apikey-keyservice",
    version,
    about = "The key service for apikey-filter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the filter's API and the admin API.
    Serve {
        /// The database: sqlite:PATH (created if missing) or postgres://USER:PASSWORD@HOST:PORT/DB.
        #[arg(long, default_value = "sqlite:apikey-keys.db")]
        db: String,
        /// The filter's API (/v1/...).
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// The admin API (/admin/v1/...) and /metrics.
        #[arg(long, default_value = "127.0.0.1:8082")]
        admin_listen: SocketAddr,
        /// When set, every /v1/ request must carry `Authorization: Bearer <its content>`.
        #[arg(long)]
        proxy_token_file: Option<PathBuf>,
        /// The prefixes new keys may have; the first is the default.
        #[arg(long, value_delimiter = ',', default_value = "ak_live_")]
        key_prefixes: Vec<String>,
        /// How long the change feed keeps changes; an older cursor gets 410.
        #[arg(long, default_value_t = 604_800)]
        changes_kept_s: i64,
    },
    /// Admin tokens: each is shown once, only its hash is stored.
    AdminToken {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Exits 0 when the service at `--url` (HOST:PORT) answers `GET /healthz` with 200:
    /// a container's health check, with no other program in the image.
    Healthz {
        #[arg(long, default_value = "127.0.0.1:8081")]
        url: String,
    },
    /// The audit log, through the admin API.
    Audit(cli::AuditCall),
    /// Keys: the admin API's calls, and keys made elsewhere.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    #[command(flatten)]
    Call(cli::KeyCall),
    /// Takes in keys by hash from a JSON file `{"keys": {"<sha256 hex>": {record}}}` (each
    /// record with its `key_id`): a key service being replaced keeps its keys. Keys already
    /// here are left as they are, so it can run at every start.
    Import {
        #[arg(long, default_value = "sqlite:apikey-keys.db")]
        db: String,
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Prints a new admin token on one line.
    Create {
        #[arg(long, default_value = "sqlite:apikey-keys.db")]
        db: String,
        #[arg(long)]
        name: String,
    },
    List {
        #[arg(long, default_value = "sqlite:apikey-keys.db")]
        db: String,
    },
    Revoke {
        #[arg(long, default_value = "sqlite:apikey-keys.db")]
        db: String,
        #[arg(long)]
        name: String,
    },
}

fn open(db: &str) -> Result<Store, String> {
    Store::open(db).map_err(|e| format!("--db: {e}"))
}

fn main() -> ExitCode {
    let done = match Cli::parse().command {
        Command::Serve {
            db,
            listen,
            admin_listen,
            proxy_token_file,
            key_prefixes,
            changes_kept_s,
        } => serve(
            &db,
            listen,
            admin_listen,
            proxy_token_file,
            key_prefixes,
            changes_kept_s,
        ),
        Command::AdminToken { command } => admin_token(command),
        Command::Keys {
            command: KeysCommand::Import { db, file },
        } => import(&db, &file),
        Command::Keys {
            command: KeysCommand::Call(call),
        } => cli::keys(call),
        Command::Audit(call) => cli::audit(call),
        Command::Healthz { url } => healthz(&url),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("apikey-keyservice: {why}");
            ExitCode::FAILURE
        }
    }
}

fn healthz(address: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let timeout = Some(Duration::from_secs(2));
    let addr: SocketAddr = address
        .parse()
        .map_err(|e| format!("--url {address}: {e}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{address}: {e}"))?;
    let _ = stream.set_read_timeout(timeout);
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    match answer.starts_with("HTTP/1.1 200") {
        true => Ok(()),
        false => Err(format!("{address}: not healthy")),
    }
}

fn import(db: &str, file: &std::path::Path) -> Result<(), String> {
    let read = |e: &dyn std::fmt::Display| format!("--file {}: {e}", file.display());
    let text = std::fs::read_to_string(file).map_err(|e| read(&e))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| read(&e))?;
    let Some(keys) = doc.get("keys").and_then(serde_json::Value::as_object) else {
        return Err(read(&"no \"keys\" object"));
    };
    let store = open(db)?;
    let (mut imported, mut kept) = (0, 0);
    for (key_hash, record) in keys {
        let Some(record) = record.as_object() else {
            return Err(read(&format!("keys.{key_hash}: not an object")));
        };
        match keys::import(&store, "cli:import", now(), key_hash, record) {
            Ok(true) => imported += 1,
            Ok(false) => kept += 1,
            Err(keys::Refused::Invalid(field)) => {
                return Err(read(&format!("keys.{key_hash}: {}", field.message())))
            }
            Err(e) => return Err(format!("{e:?}")),
        }
    }
    eprintln!("apikey-keyservice: imported {imported} keys, {kept} already here");
    Ok(())
}

fn admin_token(command: TokenCommand) -> Result<(), String> {
    match command {
        TokenCommand::Create { db, name } => {
            if name.is_empty() || name.len() > 64 {
                return Err("--name: 1 to 64 characters".into());
            }
            let token = issue::new_admin_token().map_err(|e| e.to_string())?;
            match open(&db)?.add_admin_token(&name, &issue::key_hash(&token), now()) {
                Ok(()) => {
                    println!("{token}");
                    Ok(())
                }
                Err(StoreError::Conflict(why)) => Err(why),
                Err(e) => Err(format!("{e:?}")),
            }
        }
        TokenCommand::List { db } => {
            for (name, created_at, revoked_at) in
                open(&db)?.admin_tokens().map_err(|e| format!("{e:?}"))?
            {
                let revoked = revoked_at.map_or(String::new(), |at| format!("\trevoked {at}"));
                println!("{name}\tcreated {created_at}{revoked}");
            }
            Ok(())
        }
        TokenCommand::Revoke { db, name } => match open(&db)?.revoke_admin_token(&name, now()) {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound) => Err(format!("no active admin token named {name}")),
            Err(e) => Err(format!("{e:?}")),
        },
    }
}

fn serve(
    db: &str,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    proxy_token_file: Option<PathBuf>,
    prefixes: Vec<String>,
    changes_kept_s: i64,
) -> Result<(), String> {
    if prefixes.is_empty() || !prefixes.iter().all(|p| issue::is_prefix(p)) {
        return Err("--key-prefixes: each 1 to 64 visible ASCII characters".into());
    }
    let proxy_token = match proxy_token_file {
        None => None,
        Some(path) => {
            let token = std::fs::read_to_string(&path)
                .map_err(|e| format!("--proxy-token-file {}: {e}", path.display()))?;
            Some(token.trim().to_string()).filter(|t| !t.is_empty())
        }
    };
    let service = Arc::new(Service {
        store: Arc::new(open(db)?),
        cache: Default::default(),
        metrics: Default::default(),
        proxy_token,
        prefixes,
        changes_kept_s: changes_kept_s.max(1),
        feed_bound: std::sync::atomic::AtomicI64::new(-1),
        wrote: Default::default(),
        database_calls: Arc::new(tokio::sync::Semaphore::new(service::MAX_DATABASE_CALLS)),
    });
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let filter = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("--listen {listen}: {e}"))?;
        let admin = tokio::net::TcpListener::bind(admin_listen)
            .await
            .map_err(|e| format!("--admin-listen {admin_listen}: {e}"))?;
        eprintln!(
            "apikey-keyservice: serving the filter's API on {listen}, the admin API on {admin_listen}"
        );
        tokio::spawn(service::follow_changes(
            service.clone(),
            Duration::from_millis(50),
        ));
        let filter = axum::serve(filter, filter_api::routes(service.clone()))
            .with_graceful_shutdown(stopped());
        let admin =
            axum::serve(admin, admin_api::routes(service)).with_graceful_shutdown(stopped());
        let (a, b) = tokio::join!(filter, admin);
        a.and(b).map_err(|e| e.to_string())
    })
}

/// SIGTERM or Ctrl-C: stop taking requests, finish those under way.
async fn stopped() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
