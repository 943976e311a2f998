//! The `txpipe` command's library: the whole fleet in one process (`txpipe up`), the
//! validation benchmark, API-key management, and the client commands (upload, status, files,
//! validate). The test harness reuses [`fleet::run`].

pub mod bench;
pub mod bench_e2e;
pub mod client;
pub mod commands;
pub mod dlq;
pub mod fleet;
pub mod http1;
pub mod keys;
pub mod output;
pub mod provision;
