//! The `validator` binary: one validator worker process (health on `TXPIPE_HTTP_ADDR`, default 127.0.0.1:9101).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txpipe_common::service::worker_main("validator", "127.0.0.1:9101", txpipe_validator::run).await
}
