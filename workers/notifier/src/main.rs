//! The `notifier` binary: one notifier worker process (health on `TXPIPE_HTTP_ADDR`, default 127.0.0.1:9103).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txpipe_common::service::worker_main("notifier", "127.0.0.1:9103", txpipe_notifier::run).await
}
