//! The `validator` binary: one validator worker process (health and metrics on `TXPIPE_HTTP_ADDR`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txpipe_common::service::worker_main(txpipe_common::stage::Stage::Validator, |deps| {
        std::sync::Arc::new(txpipe_validator::Validator::new(deps))
    })
    .await
}
