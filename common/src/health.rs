//! `/healthz` (the process is up), `/readyz` (broker connected, storage reachable) and
//! `/metrics` (Prometheus), served by every binary; the gateway merges these routes into its
//! own router.

use crate::deps::Deps;
use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::{json, Value};

/// The health routes, for any service holding [`Deps`]; `/metrics` too if `with_metrics`
/// (not when `TXPIPE_METRICS_ADDR` serves it apart).
pub fn routes<S>(deps: Deps, with_metrics: bool) -> Router<S> {
    let router =
        Router::new().route("/healthz", get(|| async { Json(json!({"status": "ok"})) })).route("/readyz", get(readyz));
    let router = if with_metrics { router.merge(metrics_routes()) } else { router };
    router.with_state(deps)
}

fn metrics_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(
        "/metrics",
        get(|| async { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render()) }),
    )
}

/// Serves `/metrics` alone on `listener` (`TXPIPE_METRICS_ADDR`) until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_routes::<()>()).with_graceful_shutdown(shutdown).await
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
    let with_metrics = deps.settings.metrics_addr.is_none();
    axum::serve(listener, routes::<()>(deps, with_metrics)).with_graceful_shutdown(shutdown).await
}
