//! `/healthz` (the process is up), `/readyz` (broker connected, storage reachable) and
//! `/metrics` (Prometheus), served by every binary; the gateway merges these routes into its
//! own router. `/metrics` needs an API key (every binary shares the key table through its
//! storage); the probes never do, so orchestrators need no secret.

use crate::deps::Deps;
use crate::metrics::{DlqDepth, InternalEvent};
use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::{json, Value};

/// The health routes, for any service holding [`Deps`]; `/metrics` too if `with_metrics`
/// (not when `TXPIPE_METRICS_ADDR` serves it apart). `/metrics` needs a key; the probes never do.
pub fn routes<S>(deps: Deps, with_metrics: bool) -> Router<S> {
    let router = Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz));
    let router = if with_metrics { router.merge(metrics_routes(deps.clone())) } else { router };
    router.with_state(deps)
}

/// `/metrics`, behind the API key check, with its own state.
fn metrics_routes<S: Clone + Send + Sync + 'static>(deps: Deps) -> Router<S> {
    Router::new()
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(deps.clone(), crate::auth::require_key))
        .with_state(deps)
}

/// Serves `/metrics` alone on `listener` (`TXPIPE_METRICS_ADDR`) until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_routes::<()>(deps)).with_graceful_shutdown(shutdown).await
}

/// `/healthz`: the process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The metrics, with the DLQ's depth read from the broker now (bounded: a broker that does not
/// answer leaves the last value). The gateway serves these handlers on its own router.
pub async fn metrics(State(deps): State<Deps>) -> impl axum::response::IntoResponse {
    let dlq = deps.names.dead_letter_queue();
    if let Ok(Ok(messages)) = tokio::time::timeout(DLQ_READ_TIMEOUT, deps.broker.queue_depth(&dlq)).await {
        DlqDepth { messages }.emit();
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render())
}

/// How long a scrape waits for the DLQ's depth.
const DLQ_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// `/readyz`: 200 when the broker is connected and storage answers, else 503 with the reason.
pub async fn readyz(State(deps): State<Deps>) -> (StatusCode, Json<Value>) {
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
    let with_metrics = deps.settings.metrics_addr.is_none();
    axum::serve(listener, routes::<()>(deps, with_metrics)).with_graceful_shutdown(shutdown).await
}
