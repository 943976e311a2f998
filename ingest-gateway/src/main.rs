//! The `ingest-gateway` binary: load settings, start logging, connect, serve until shutdown.

use anyhow::Context;
use txpipe_common::{shutdown::shutdown_signal, telemetry, Deps, Settings};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped");
            eprintln!("ingest-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    telemetry::init("ingest-gateway", settings.log_format);
    let addr = settings.http_addr_or("127.0.0.1:8080");
    let deps = Deps::connect(settings).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set TXPIPE_HTTP_ADDR)"))?;
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    txpipe_ingest_gateway::run(listener, deps.clone(), shutdown_signal()).await?;
    deps.broker.close().await;
    Ok(())
}
