//! The `ingest-gateway` binary: the gateway alone in its process (on `TXPIPE_HTTP_ADDR`,
//! default 127.0.0.1:8080).

use txpipe_common::stage::Service;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txpipe_common::service::main("ingest-gateway", Service::Gateway.default_http_addr(), |listener, deps, shutdown| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "gateway listening");
        }
        txpipe_ingest_gateway::run(listener, deps, shutdown)
    })
    .await
}
