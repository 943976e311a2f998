//! The `transformer` binary: one transformer worker process (health and metrics on `TXPIPE_HTTP_ADDR`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txpipe_common::service::worker_main(txpipe_common::stage::Stage::Transformer, |deps| {
        std::sync::Arc::new(txpipe_transformer::Transformer::new(deps))
    })
    .await
}
