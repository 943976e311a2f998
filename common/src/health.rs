//! `/healthz` (the process is up), `/readyz` (broker connected, storage reachable) and
//! `/metrics` (Prometheus), served by every binary; the gateway merges these routes into its
//! own router. `/metrics` needs an API key (every binary shares the key table through its
//! storage); the probes never do, so orchestrators need no secret.

use crate::deps::Deps;
use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::{json, Value};

/// The health routes, for any service holding [`Deps`].
pub fn routes<S>(deps: Deps) -> Router<S> {
    Router::new()
        .route(
            "/metrics",
            get(|| async {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render())
            }),
        )
        // a route layer covers only the routes added before it: the probes stay open
        .route_layer(axum::middleware::from_fn_with_state(deps.clone(), crate::auth::require_key))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(deps)
}

async fn readyz(State(deps): State<Deps>) -> (StatusCode, Json<Value>) {
    match deps.readiness().await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "reason": why}))),
    }
}

/// Serves the health routes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, routes::<()>(deps)).with_graceful_shutdown(shutdown).await
}
