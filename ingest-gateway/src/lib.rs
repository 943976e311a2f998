//! The ingest gateway: `POST /upload` streams a CSV into the object store, records it as
//! `uploaded` and publishes `file.uploaded` (its confirm awaited) before answering 202; the
//! read endpoints show a file's status and its stored transactions.
//!
//! Every route but the probes needs an API key (`txpipe_common::auth`); a caller sees only the
//! files its key uploaded (admin keys see all), within its key's rate and daily quota
//! ([`limits`]).
//!
//! Claim check: the broker carries only a small message pointing at the stored object. If
//! the store or the broker cannot take an upload, the client gets 503 and nothing is left
//! behind claiming it was accepted.

mod error;
mod files;
pub mod limits;
mod upload;

pub use error::GatewayError;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;
use txpipe_common::stage::Service;
use txpipe_common::Deps;

/// The gateway's routes over `deps`.
pub fn router(deps: Deps) -> Router {
    let limiter = Arc::new(limits::RateLimiter::default());
    Router::new()
        .route("/upload", post(upload::upload))
        .route("/files/{file_id}", get(files::file_status))
        .route("/files/{file_id}/transactions", get(files::file_transactions))
        // the last layer runs first: the key is checked, then its rate
        .route_layer(axum::middleware::from_fn_with_state(limiter, limits::rate_limit))
        .route_layer(axum::middleware::from_fn_with_state(deps.clone(), txpipe_common::auth::require_key))
        .with_state(deps.clone())
        .merge(txpipe_common::health::routes(deps))
        // the upload body is streamed and its size checked as it arrives
        .layer(DefaultBodyLimit::disable())
        // the access log: one line per request at info, with method, path, status and latency
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
}

/// Serves the gateway on `listener` until `shutdown` resolves. Declares the queue uploads go
/// to first, so an upload accepted before any validator runs still waits for one. While the
/// broker is unreachable, uploads get 503; if reconnecting is given up, the gateway stops
/// with an error so a supervisor restarts it.
pub async fn run(
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    deps.broker.declare_for(Service::Gateway).await.map_err(|e| GatewayError::Unavailable(e.to_string()))?;
    let broker = deps.broker.clone();
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = broker.gave_up() => flag.store(true, Ordering::SeqCst),
        }
    };
    axum::serve(listener, router(deps.clone()))
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    if lost.load(Ordering::SeqCst) {
        return Err(GatewayError::Unavailable(
            "lost RabbitMQ for longer than TXPIPE_RECONNECT_TIMEOUT_MS; stopping".into(),
        ));
    }
    Ok(())
}
