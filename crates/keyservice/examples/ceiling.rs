//! The ceiling for lab/keyservice-bench: the key service's own stack (tokio, axum) answering
//! every request with a fixed record, no state. `ceiling HOST:PORT`.
use axum::routing::get;
use axum::Router;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8091".into());
    let record = r#"{"key_id":"k_bzYrEK5JvA1CLBBx","owner":"acme","scopes":["orders:read"]}"#;
    let app = Router::new().route(
        "/v1/keys/{key_hash}",
        get(move || async move { ([("content-type", "application/json")], record) }),
    );
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("ceiling: serving on {listen}");
    axum::serve(listener, app).await
}
