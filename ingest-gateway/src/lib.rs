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
//!
//! It faces the internet, so no client can wedge it: connections are served by hyper
//! directly (axum::serve has no timeouts) with a deadline for the request head, a cap on open
//! connections, a per-chunk idle deadline on upload bodies, a cap on uploads in flight, and a
//! bounded wait for requests in flight at shutdown.
//!
//! An upload may carry an `Idempotency-Key` ([`idempotency`]: a repeat gets the first answer,
//! kept in the table store so every replica agrees) and `Prefer: wait=N` ([`verdicts`]: the
//! answer waits for the validator's verdict, woken by the pipeline's events on a queue of this
//! gateway's own).
//!
//! The routes are built from their handlers' OpenAPI annotations ([`openapi`]), so the
//! document at `GET /openapi.json` lists exactly what the router serves.

mod error;
mod files;
mod idempotency;
pub mod limits;
mod multipart;
mod openapi;
mod sweep;
mod upload;
mod verdicts;

pub use error::{GatewayError, REQUEST_ID_HEADER};

use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use txpipe_common::stage::Service;
use txpipe_common::{Deps, Settings};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The routes that need an API key and count against its rate. A new route is its handler's
/// `#[utoipa::path]` annotation and one `routes!` line here.
fn keyed_routes() -> OpenApiRouter<Deps> {
    OpenApiRouter::new()
        .routes(routes!(upload::upload))
        .routes(routes!(files::list_files))
        .routes(routes!(files::file_status))
        .routes(routes!(files::file_transactions))
        .routes(routes!(files::transaction))
}

/// The routes anyone may call: the probes and the document.
fn public_routes() -> OpenApiRouter<Deps> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz)).routes(routes!(openapi_json))
}

/// `/metrics`: needs a key, but no rate (a scraper must not be refused).
fn metrics_routes() -> OpenApiRouter<Deps> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// The gateway's OpenAPI document; `with_metrics` as in the settings (no `TXPIPE_METRICS_ADDR`).
pub fn openapi(with_metrics: bool) -> utoipa::openapi::OpenApi {
    let mut api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi()).merge(keyed_routes()).merge(public_routes());
    if with_metrics {
        api = api.merge(metrics_routes());
    }
    let mut doc = api.into_openapi();
    openapi::finish(&mut doc);
    doc
}

/// The served document, rendered once.
#[derive(Clone)]
struct Document(bytes::Bytes);

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = openapi::PUBLIC,
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = Object)))]
async fn openapi_json(Extension(doc): Extension<Document>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], doc.0)
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = openapi::PUBLIC,
    responses((status = 200, description = "Up", body = Object, example = json!({"status": "ok"}))))]
async fn healthz() -> impl IntoResponse {
    txpipe_common::health::healthz().await
}

/// Ready to take uploads: the broker is connected and storage answers.
#[utoipa::path(get, path = "/readyz", tag = openapi::PUBLIC,
    responses(
        (status = 200, description = "Ready", body = Object, example = json!({"status": "ready"})),
        (status = 503, description = "Not ready, and why", body = Object,
            example = json!({"status": "not_ready", "reason": "RabbitMQ is not connected"})),
    ))]
async fn readyz(state: State<Deps>) -> impl IntoResponse {
    txpipe_common::health::readyz(state).await
}

/// Prometheus metrics of this gateway.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(state: State<Deps>) -> impl IntoResponse {
    txpipe_common::health::metrics(state).await
}

/// The gateway's routes over `deps`. Uploads that wait for their verdict read their status
/// every 2 s; [`run`] also has them woken by the pipeline's events.
pub fn router(deps: Deps) -> Router {
    router_with(deps, verdicts::Verdicts::default())
}

fn router_with(deps: Deps, verdicts: verdicts::Verdicts) -> Router {
    let limiter = Arc::new(limits::RateLimiter::default());
    let slots = upload::UploadSlots::new(deps.settings.max_uploads_in_flight);
    let with_metrics = deps.settings.metrics_addr.is_none();
    let require_key = || axum::middleware::from_fn_with_state(deps.clone(), txpipe_common::auth::require_key);
    let keyed = keyed_routes()
        // the last layer runs first: the key is checked, then its rate
        .route_layer(axum::middleware::from_fn_with_state(limiter, limits::rate_limit))
        .route_layer(require_key());
    let mut api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi()).merge(keyed).merge(public_routes());
    if with_metrics {
        api = api.merge(metrics_routes().route_layer(require_key()));
    }
    let (routes, mut doc) = api.split_for_parts();
    openapi::finish(&mut doc);
    let doc = Document(serde_json::to_vec(&doc).unwrap_or_default().into());
    routes
        .with_state(deps)
        .fallback(|| async { GatewayError::NotFound("no such endpoint".into()) })
        .layer(Extension(doc))
        .layer(Extension(slots))
        .layer(Extension(verdicts))
        // the upload body is streamed and its size checked as it arrives
        .layer(DefaultBodyLimit::disable())
        .layer(CatchPanicLayer::custom(error::panicked))
        // the access log: one line per request at info, with method, path, status, latency and request id
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::extract::Request| {
                    let id = req.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), uri = %LoggedUri(req.uri()), request_id = %id)
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(axum::middleware::from_fn(error::request_scope))
}

/// The most characters of a request's URI in the access log.
const LOGGED_URI_CHARS: usize = 1000;

/// A request's URI for the access log: a URI may be as long as hyper lets a request line be,
/// so a long one is cut to its first [`LOGGED_URI_CHARS`]. Written as the span is recorded,
/// nothing copied before.
struct LoggedUri<'a>(&'a axum::http::Uri);

impl std::fmt::Display for LoggedUri<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pq = self.0.path_and_query().map_or("", |p| p.as_str());
        // a URI is ASCII (hyper refuses anything else), so a byte index is a character's
        match pq.get(..LOGGED_URI_CHARS).filter(|_| pq.len() > LOGGED_URI_CHARS) {
            Some(start) => write!(f, "{start}…"),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves. Declares the queue uploads go
/// to first, so an upload accepted before any validator runs still waits for one. While the
/// broker is unreachable, uploads get 503; if reconnecting is given up, the gateway stops
/// with an error so a supervisor restarts it. The sweeper of unannounced uploads runs beside it,
/// and so does the subscription that wakes uploads waiting for their verdict.
pub async fn run(
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    deps.broker.declare_for(Service::Gateway).await.map_err(|e| GatewayError::Unavailable(e.to_string()))?;
    let broker = deps.broker.clone();
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    let verdicts = verdicts::Verdicts::default();
    let waits = verdicts.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = broker.gave_up() => flag.store(true, Ordering::SeqCst),
        }
        // uploads waiting for a verdict answer now (202), so shutdown need not wait for them
        waits.stop();
    };
    let sweeping = CancellationToken::new();
    let sweeper = tokio::spawn(sweep::run(deps.clone(), sweeping.clone()));
    let listener_task = tokio::spawn(verdicts::listen(deps.clone(), verdicts.clone(), sweeping.clone()));
    serve(listener, router_with(deps.clone(), verdicts), &deps.settings, stop).await;
    sweeping.cancel();
    let _ = sweeper.await;
    let _ = listener_task.await;
    if lost.load(Ordering::SeqCst) {
        return Err(GatewayError::Unavailable(
            "lost RabbitMQ for longer than TXPIPE_RECONNECT_TIMEOUT_MS; stopping".into(),
        ));
    }
    Ok(())
}

/// One task per HTTP/1.1 connection, at most `max_connections` at once (past that, connections wait
/// in the listen backlog); the request head must arrive within `header_read_timeout_ms`. On
/// `stop`, stops accepting, asks every connection to finish its request and close, and waits
/// up to `shutdown_grace_ms` for them.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    settings: &Settings,
    stop: impl std::future::Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // HTTP/1 only: hyper's head timeout then also covers a connection that never sends a
    // byte and an idle keep-alive connection (auto-detecting HTTP/2 would first wait, with no
    // deadline, for enough bytes to tell the versions apart)
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(settings.header_read_timeout_ms))
        // a client that closes its side once its body is sent still gets its upload accepted
        // (without this, hyper drops the request on that EOF, half-way through storing it)
        .half_close(true);
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // out of file descriptors, say: let connections close before trying again
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service.clone()));
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = Duration::from_millis(settings.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "requests still in flight at the end of the shutdown grace; closing them");
        tasks.abort_all();
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_log_keeps_the_start_of_a_long_uri() {
        let short: axum::http::Uri = "/files?status=completed".parse().unwrap();
        assert_eq!(LoggedUri(&short).to_string(), "/files?status=completed");
        let long: axum::http::Uri = format!("/upload?mode={}", "z".repeat(60_000)).parse().unwrap();
        let logged = LoggedUri(&long).to_string();
        assert_eq!(logged.chars().count(), LOGGED_URI_CHARS + 1, "the first characters and an ellipsis");
        assert!(logged.starts_with("/upload?mode=zzz") && logged.ends_with('…'));
    }
}
