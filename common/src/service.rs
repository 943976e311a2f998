//! The life of a worker process, shared by the `validator`, `transformer` and `notifier`
//! binaries: load settings, start logging, connect, serve health, consume until shutdown.

use crate::amqp::AmqpError;
use crate::config::Settings;
use crate::deps::Deps;
use std::future::Future;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Runs one worker process to the end. `run` consumes until the future it is given resolves.
/// Exits non-zero, with the reason logged, when startup fails or the broker is lost.
pub async fn worker_main<F, Fut>(service: &'static str, default_addr: &str, run: F) -> ExitCode
where
    F: FnOnce(Deps, tokio_util::sync::WaitForCancellationFutureOwned) -> Fut,
    Fut: Future<Output = Result<(), AmqpError>>,
{
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(service, settings.log_format);
    let addr = settings.http_addr_or(default_addr);
    let deps = match Deps::connect(settings).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %crate::error::Chain(&e), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen for health checks (set TXPIPE_HTTP_ADDR)");
            return ExitCode::FAILURE;
        }
    };
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_string());
    tracing::info!(addr = %bound, "health endpoints on /healthz and /readyz");
    let stop = CancellationToken::new();
    let health = tokio::spawn(crate::health::serve(listener, deps.clone(), stop.clone().cancelled_owned()));
    let signal = stop.clone();
    tokio::spawn(async move {
        crate::shutdown::shutdown_signal().await;
        signal.cancel();
    });
    let result = run(deps.clone(), stop.clone().cancelled_owned()).await;
    stop.cancel();
    let _ = health.await;
    deps.broker.close().await;
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "stopped on a broker failure");
            ExitCode::FAILURE
        }
    }
}
