//! The life of every txpipe process, written once: load settings, start logging, connect to
//! storage and the broker, bind the HTTP listener, run until SIGTERM or Ctrl-C, close the
//! broker link, flush exported spans, and exit with a status that says how it went. Each binary's `main` names
//! itself and passes the one thing it runs.

use crate::config::Settings;
use crate::deps::Deps;
use crate::stage::{Service, Stage};
use crate::worker::Handler;
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Runs one process to the end. `run` gets the bound listener, the dependencies and a future
/// that resolves on shutdown; it returns when the service has stopped. Exits 2 on unusable
/// settings, 1 when startup fails or the service stops on an error (the reason logged and
/// printed), 0 after a clean shutdown.
pub async fn main<F, Fut, E>(service: &'static str, default_addr: &str, run: F) -> ExitCode
where
    F: FnOnce(tokio::net::TcpListener, Deps, WaitForCancellationFutureOwned) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(service, settings.log_format);
    if settings.auth == crate::config::AuthMode::None {
        tracing::warn!("TXPIPE_AUTH=none: no API keys asked, no quotas or rate limits; anyone who can reach this service may use it");
    }
    let addr = settings.http_addr_or(default_addr);
    let deps = match Deps::connect(settings).await {
        Ok(d) => d,
        Err(e) => return failed(service, "cannot start", e),
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return failed(service, &format!("cannot listen on {addr} (set TXPIPE_HTTP_ADDR)"), e),
    };
    let stop = CancellationToken::new();
    // metrics on their own address, if asked, so they need not face the internet
    let metrics = match deps.settings.metrics_addr {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(addr = %bound, "metrics on /metrics");
                Some(tokio::spawn(crate::health::serve_metrics(l, deps.clone(), stop.clone().cancelled_owned())))
            }
            Err(e) => return failed(service, &format!("cannot listen on {addr} (set TXPIPE_METRICS_ADDR)"), e),
        },
    };
    let signal = stop.clone();
    // listening from here on, before anything is started or printed
    let asked = crate::shutdown::shutdown_signal();
    tokio::spawn(async move {
        asked.await;
        signal.cancel();
    });
    let result = run(listener, deps.clone(), stop.clone().cancelled_owned()).await;
    stop.cancel();
    if let Some(m) = metrics {
        let _ = m.await;
    }
    deps.broker.close().await;
    // the spans of the last messages go out before the process does
    crate::telemetry::shutdown(std::time::Duration::from_secs(5)).await;
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => failed(service, "stopped", e),
    }
}

fn failed(service: &str, what: &str, e: impl Display) -> ExitCode {
    tracing::error!(error = %e, "{what}");
    eprintln!("{service}: {what}: {e}");
    ExitCode::FAILURE
}

/// A worker binary's whole `main`: health and metrics on its listener, the stage's loop with
/// the handler `make` builds, until shutdown (or until the broker is given up).
pub async fn worker_main(stage: Stage, make: impl FnOnce(Deps) -> Arc<dyn Handler>) -> ExitCode {
    let service = Service::Worker(stage);
    main(service.name(), service.default_http_addr(), |listener, deps, shutdown| {
        let handler = make(deps.clone());
        run_worker(listener, deps, handler, shutdown)
    })
    .await
}

async fn run_worker(
    listener: tokio::net::TcpListener,
    deps: Deps,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::amqp::AmqpError> {
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(addr = %bound, "health endpoints on /healthz and /readyz");
    let stop = CancellationToken::new();
    let health = tokio::spawn(crate::health::serve(listener, deps.clone(), stop.clone().cancelled_owned()));
    let result = crate::worker::run(&deps, handler, shutdown).await;
    stop.cancel();
    let _ = health.await;
    result
}
