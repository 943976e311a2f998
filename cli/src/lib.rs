//! The `txpipe` command's library: the whole fleet in one process (`txpipe up`), the
//! validation benchmark, API-key management, and small client helpers. The test harness reuses [`fleet::run`].

pub mod bench;
pub mod bench_e2e;
pub mod dlq;
pub mod fleet;
pub mod keys;
pub mod provision;
