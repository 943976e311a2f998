//! The `transformer` binary: one transformer worker process (health on `TXPIPE_HTTP_ADDR`, default 127.0.0.1:9102).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txpipe_common::service::worker_main("transformer", "127.0.0.1:9102", txpipe_transformer::run).await
}
