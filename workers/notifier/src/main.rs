//! The `notifier` binary: one notifier worker process (health and metrics on `TXPIPE_HTTP_ADDR`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txpipe_common::service::worker_main(txpipe_common::stage::Stage::Notifier, |deps| {
        std::sync::Arc::new(txpipe_notifier::Notifier::new(deps))
    })
    .await
}
