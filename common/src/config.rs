//! Typed settings in one place: defaults, then `TXPIPE_*` environment overrides.
//!
//! Every binary loads [`Settings::load`] once in `main` and passes it down; nothing else
//! reads the environment (the AWS SDK reads its own variables for the aws backend).

use figment::{
    providers::{Env, Serialized},
    Figment,
};
use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Which storage backend holds objects and tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Objects under `TXPIPE_DATA_DIR`, tables in SQLite there: one machine, no services.
    Local,
    /// S3 and DynamoDB through the AWS SDK.
    Aws,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Whether the HTTP endpoints ask for an API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Every endpoint but `/healthz` and `/readyz` needs a key (`x-api-key` or `Authorization: Bearer`).
    ApiKey,
    /// No keys asked, no quotas or rate limits: an explicit opt-out, warned about at start.
    None,
}

/// All settings of every txpipe service. Field `foo_bar` is read from `TXPIPE_FOO_BAR`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// AMQP URL of the broker; several, comma-separated, for the nodes of a cluster (tried in
    /// turn, and failed over to when a connection is lost).
    pub amqp_url: String,
    /// Prefix of every exchange, queue, table and bucket.
    pub namespace: String,
    /// Where this process serves HTTP; each binary has its own default.
    pub http_addr: Option<SocketAddr>,
    /// `local` or `aws`.
    pub storage: StorageKind,
    /// Root of the embedded storage (objects and the SQLite file).
    pub data_dir: PathBuf,
    /// How many unacked messages a worker holds at once (AMQP prefetch).
    pub prefetch: u16,
    /// Largest accepted upload in bytes.
    pub max_upload_bytes: u64,
    /// How many row errors a file's status keeps (the total is always counted); at most
    /// [`crate::status::MAX_RECORDED_ERRORS`], so the record fits a DynamoDB item.
    pub max_reported_errors: usize,
    /// Attempts for a transient fault before the message is dead-lettered.
    pub retry_attempts: usize,
    /// First retry delay in milliseconds.
    pub retry_initial_delay_ms: u64,
    /// Growth of the retry delay per attempt.
    pub retry_factor: f32,
    /// Crashes of a worker on one file (or one message) before it is failed and dead-lettered;
    /// RabbitMQ's own `x-delivery-limit` is set well above it, as a safety net only.
    pub delivery_limit: u32,
    /// Rows per write batch in the transformer.
    pub batch_size: usize,
    /// Gateway: uploads of at most this many bytes (UTF-8) travel inside their stage messages
    /// too, so the validator and transformer need not read the object back; 0: never.
    pub inline_max_bytes: usize,
    /// DynamoDB: conditional writes (TransactWriteItems of up to 50 rows) of one batch in
    /// flight at once, so a provisioned table can be filled at its capacity.
    pub dynamodb_write_concurrency: usize,
    /// What a row does whose transaction another file already stored with other values:
    /// `reject` (the file is refused, or in partial mode the row) or `update` (a new version).
    pub on_conflict: crate::status::OnConflict,
    /// Lets an upload choose with `?on_conflict=reject|update`; otherwise asking for anything
    /// but `TXPIPE_ON_CONFLICT` is refused with 400.
    pub allow_upload_on_conflict: bool,
    /// `json` or `pretty`.
    pub log_format: LogFormat,
    /// S3 path-style addressing (`http://host/bucket/key`); unset: on when the SDK has a
    /// custom endpoint (`AWS_ENDPOINT_URL`, as for MinIO, LocalStack, moto), off otherwise.
    pub s3_force_path_style: Option<bool>,
    /// S3 server-side encryption for stored files: `AES256` or `aws:kms`; unset: none asked.
    pub s3_sse: Option<String>,
    /// Uploads larger than this go to S3 as a multipart upload.
    pub s3_multipart_threshold_bytes: u64,
    /// Part size of multipart uploads (S3's minimum is 5 MiB); also the most an upload holds in memory.
    pub s3_part_size_bytes: u64,
    /// How long a service keeps trying to reconnect to RabbitMQ before it exits non-zero.
    pub reconnect_timeout_ms: u64,
    /// Deadline of one AWS call, retries included, in milliseconds (the SDK has none by default).
    pub aws_operation_timeout_ms: u64,
    /// `api-key` (the default) or `none`.
    pub auth: AuthMode,
    /// Uploads a UTC day for keys created without `--daily-quota`.
    pub daily_quota: u64,
    /// Requests a second for keys created without `--rate`.
    pub rate_per_second: f64,
    /// Burst for keys created without `--burst`.
    pub rate_burst: u32,
    /// The key the CLI's client commands send (`txpipe upload`, `txpipe status`); services
    /// accept the variable and ignore it, so a user may export it in any shell.
    pub api_key: Option<crate::auth::Secret>,
    /// Where `/metrics` is served instead of the main HTTP address; unset: on the main address.
    pub metrics_addr: Option<SocketAddr>,
    /// Gateway: how long a client has to send a request's head (line and headers), in ms.
    pub header_read_timeout_ms: u64,
    /// Gateway: how long an upload body may go without a byte before the upload is dropped, in ms.
    pub body_idle_timeout_ms: u64,
    /// Gateway: uploads whose bodies are being read at once; past it, 503 before the body is read.
    pub max_uploads_in_flight: usize,
    /// Gateway: open client connections; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Gateway: how long shutdown waits for requests in flight before closing their connections, in ms.
    pub shutdown_grace_ms: u64,
    /// Gateway: an upload recorded but still unannounced this long after it was recorded is
    /// withdrawn (its record and object removed) by the sweeper, in ms.
    pub unannounced_sweep_after_ms: u64,
    /// Gateway: most bytes of transactions (as JSON) in one page of `GET /files/{id}/transactions`.
    pub max_page_bytes: usize,
    /// Workers: a file in a working status whose attempt has shown no sign of life (a heartbeat,
    /// every quarter of this) for this long is stuck: its attempt is taken as dead, a copy
    /// waiting for it takes over, and the stuck-file sweep resumes it, in ms.
    pub stuck_after_ms: u64,
}

/// The most `TXPIPE_INLINE_MAX_BYTES` may be.
const MAX_INLINE_BYTES: usize = 1024 * 1024;

impl Default for Settings {
    fn default() -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            namespace: "txpipe".into(),
            http_addr: None,
            storage: StorageKind::Local,
            data_dir: PathBuf::from("./data"),
            prefetch: 8,
            max_upload_bytes: 256 * 1024 * 1024,
            max_reported_errors: 100,
            retry_attempts: 3,
            retry_initial_delay_ms: 2000,
            retry_factor: 2.0,
            delivery_limit: 5,
            batch_size: 2000,
            inline_max_bytes: 16 * 1024,
            dynamodb_write_concurrency: 4,
            on_conflict: crate::status::OnConflict::Reject,
            allow_upload_on_conflict: false,
            log_format: LogFormat::Json,
            s3_force_path_style: None,
            s3_sse: None,
            s3_multipart_threshold_bytes: 16 * 1024 * 1024,
            s3_part_size_bytes: 8 * 1024 * 1024,
            aws_operation_timeout_ms: 30_000,
            reconnect_timeout_ms: 60_000,
            auth: AuthMode::ApiKey,
            // the seed's usage plan: 1,000 uploads a day
            daily_quota: 1000,
            rate_per_second: 10.0,
            rate_burst: 20,
            api_key: None,
            metrics_addr: None,
            header_read_timeout_ms: 10_000,
            body_idle_timeout_ms: 30_000,
            max_uploads_in_flight: 64,
            max_connections: 1024,
            shutdown_grace_ms: 30_000,
            unannounced_sweep_after_ms: 300_000,
            max_page_bytes: 1024 * 1024,
            stuck_after_ms: 60_000,
        }
    }
}

/// Settings that cannot be used, with the variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}", describe(.0))]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid setting TXPIPE_NAMESPACE: {0}")]
    Namespace(#[from] crate::names::InvalidNamespace),
    #[error("invalid setting {name}: {why}")]
    Value { name: &'static str, why: &'static str },
}

/// Every error figment found, each naming the variable to fix as the user set it
/// (`TXPIPE_DELIVERY_LIMIT`, not figment's `delivery_limit`).
fn describe(e: &figment::Error) -> String {
    let one = |e: figment::Error| match (&e.kind, e.path.last()) {
        (figment::error::Kind::UnknownField(name, _), _) => {
            format!("unknown setting TXPIPE_{} (misspelt? the README lists the settings)", name.to_uppercase())
        }
        (kind, Some(key)) => format!("invalid setting TXPIPE_{}: {kind}", key.to_uppercase()),
        (kind, None) => format!("invalid setting: {kind}"),
    };
    e.clone().into_iter().map(one).collect::<Vec<_>>().join("; ")
}

/// `TXPIPE_*` variables that are not settings but knobs of the project's own scripts and tests
/// (`scripts/ensure-moto`, `scripts/api-fuzz`, the test suite), which start services with the
/// environment they were given. They are passed over, not refused as misspelt settings, so a
/// developer may export them in any shell, as with `TXPIPE_API_KEY`.
const TOOLING_VARIABLES: [&str; 4] = ["CACHE_DIR", "MOTO_PORT", "API_FUZZ_SECONDS", "TEST_STORAGE"];

impl Settings {
    /// Defaults overridden by `TXPIPE_*` variables of this process's environment.
    pub fn load() -> Result<Self, ConfigError> {
        let env = Env::prefixed("TXPIPE_").ignore(&TOOLING_VARIABLES);
        Self::from_figment(Figment::from(Serialized::defaults(Settings::default())).merge(env))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.check()?;
        Ok(settings)
    }

    /// Refuses values that would only fail later, far from their cause.
    pub fn check(&self) -> Result<(), ConfigError> {
        crate::names::Names::new(&self.namespace)?;
        let bad = |name, why| Err(ConfigError::Value { name, why });
        if self.amqp_urls().is_empty() {
            return bad("TXPIPE_AMQP_URL", "must name at least one broker (amqp://user:password@host:port/vhost)");
        }
        if self.prefetch == 0 {
            return bad("TXPIPE_PREFETCH", "must be at least 1");
        }
        if self.max_upload_bytes == 0 {
            return bad("TXPIPE_MAX_UPLOAD_BYTES", "must be at least 1");
        }
        if self.max_reported_errors > crate::status::MAX_RECORDED_ERRORS {
            return bad(
                "TXPIPE_MAX_REPORTED_ERRORS",
                "must be at most 500: a file's status record keeps that many row errors at most, so it fits \
                 a DynamoDB item (400 KB); every error is still counted in error_count",
            );
        }
        if self.retry_attempts == 0 {
            return bad("TXPIPE_RETRY_ATTEMPTS", "must be at least 1 (1 means no retry)");
        }
        if !(self.retry_factor.is_finite() && self.retry_factor >= 1.0) {
            return bad("TXPIPE_RETRY_FACTOR", "must be a number of at least 1.0");
        }
        if self.delivery_limit == 0 {
            return bad("TXPIPE_DELIVERY_LIMIT", "must be at least 1");
        }
        if self.inline_max_bytes > MAX_INLINE_BYTES {
            return bad(
                "TXPIPE_INLINE_MAX_BYTES",
                "must be at most 1048576 (a broker message is no place for a large file)",
            );
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return bad("TXPIPE_BATCH_SIZE", "must be between 1 and 10000");
        }
        if self.dynamodb_write_concurrency == 0 || self.dynamodb_write_concurrency > 256 {
            return bad("TXPIPE_DYNAMODB_WRITE_CONCURRENCY", "must be between 1 and 256");
        }
        if self.s3_part_size_bytes < 5 * 1024 * 1024 || self.s3_part_size_bytes > 512 * 1024 * 1024 {
            return bad("TXPIPE_S3_PART_SIZE_BYTES", "must be between 5 MiB (S3's minimum part) and 512 MiB");
        }
        if self.s3_multipart_threshold_bytes < self.s3_part_size_bytes {
            return bad("TXPIPE_S3_MULTIPART_THRESHOLD_BYTES", "must be at least TXPIPE_S3_PART_SIZE_BYTES");
        }
        if let Some(sse) = &self.s3_sse {
            if sse != "AES256" && sse != "aws:kms" {
                return bad("TXPIPE_S3_SSE", "must be AES256 or aws:kms");
            }
        }
        if crate::auth::KeyLimits::check(self.daily_quota, self.rate_per_second, self.rate_burst).is_err() {
            return bad(
                "TXPIPE_DAILY_QUOTA, TXPIPE_RATE_PER_SECOND or TXPIPE_RATE_BURST",
                "need a quota of at least 1, a rate above 0 and a burst of at least 1",
            );
        }
        if self.aws_operation_timeout_ms < 100 {
            return bad("TXPIPE_AWS_OPERATION_TIMEOUT_MS", "must be at least 100");
        }
        if self.header_read_timeout_ms < 100 {
            return bad("TXPIPE_HEADER_READ_TIMEOUT_MS", "must be at least 100");
        }
        if self.body_idle_timeout_ms < 100 {
            return bad("TXPIPE_BODY_IDLE_TIMEOUT_MS", "must be at least 100");
        }
        if self.max_uploads_in_flight == 0 {
            return bad("TXPIPE_MAX_UPLOADS_IN_FLIGHT", "must be at least 1");
        }
        if self.max_connections == 0 || self.max_connections < self.max_uploads_in_flight {
            return bad("TXPIPE_MAX_CONNECTIONS", "must be at least 1 and at least TXPIPE_MAX_UPLOADS_IN_FLIGHT");
        }
        // too short only costs uploads (withdrawn mid-announce, answered 503), never data
        if self.unannounced_sweep_after_ms < 1000 {
            return bad("TXPIPE_UNANNOUNCED_SWEEP_AFTER_MS", "must be at least 1000");
        }
        // shorter only risks taking a slow attempt for dead (a second copy then works with it)
        if self.stuck_after_ms < 1000 {
            return bad("TXPIPE_STUCK_AFTER_MS", "must be at least 1000");
        }
        if self.max_page_bytes < 1024 {
            return bad("TXPIPE_MAX_PAGE_BYTES", "must be at least 1024");
        }
        if self.metrics_addr.is_some() && self.metrics_addr == self.http_addr {
            return bad("TXPIPE_METRICS_ADDR", "must differ from TXPIPE_HTTP_ADDR");
        }
        Ok(())
    }

    /// The broker's addresses, in the order they are tried.
    pub fn amqp_urls(&self) -> Vec<String> {
        self.amqp_url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect()
    }

    /// The resource names of this namespace (valid: [`Settings::check`] passed).
    pub fn names(&self) -> crate::Names {
        crate::Names::new(&self.namespace).expect("namespace checked when settings were loaded")
    }

    /// The HTTP address, or `default` when `TXPIPE_HTTP_ADDR` is unset.
    pub fn http_addr_or(&self, default: &str) -> SocketAddr {
        self.http_addr.unwrap_or_else(|| default.parse().expect("valid default address"))
    }

    /// The retry policy for transient faults, as `backon` wants it.
    pub fn retry_policy(&self) -> backon::ExponentialBuilder {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.retry_initial_delay_ms))
            .with_factor(self.retry_factor)
            .with_max_delay(Duration::from_secs(300))
            // attempts include the first try; backon counts retries
            .with_max_times(self.retry_attempts.saturating_sub(1))
            .with_jitter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads settings with exactly these `TXPIPE_*` variables set (figment's Jail isolates them).
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn with_env(pairs: &[(&str, &str)]) -> Result<Settings, String> {
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in pairs {
                jail.set_env(k, v);
            }
            out = Some(Settings::load().map_err(|e| e.to_string()));
            Ok(())
        });
        out.unwrap()
    }

    #[test]
    fn defaults_are_usable() {
        let s = with_env(&[]).unwrap();
        assert_eq!(s.namespace, "txpipe");
        assert_eq!(s.storage, StorageKind::Local);
        assert_eq!(s.max_upload_bytes, 256 * 1024 * 1024);
        assert_eq!(s.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    }

    #[test]
    fn environment_overrides_defaults() {
        let s = with_env(&[
            ("TXPIPE_NAMESPACE", "acme"),
            ("TXPIPE_HTTP_ADDR", "127.0.0.1:9999"),
            ("TXPIPE_STORAGE", "aws"),
            ("TXPIPE_PREFETCH", "32"),
        ])
        .unwrap();
        assert_eq!(s.namespace, "acme");
        assert_eq!(s.http_addr, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(s.storage, StorageKind::Aws);
        assert_eq!(s.prefetch, 32);
    }

    #[test]
    fn auth_settings_load_and_the_key_never_shows() {
        let s = with_env(&[]).unwrap();
        assert_eq!((s.auth, s.daily_quota, s.api_key.is_none()), (AuthMode::ApiKey, 1000, true));
        let s = with_env(&[("TXPIPE_AUTH", "none"), ("TXPIPE_API_KEY", "txp_sekrit"), ("TXPIPE_DAILY_QUOTA", "3")])
            .unwrap();
        assert_eq!((s.auth, s.daily_quota), (AuthMode::None, 3));
        assert_eq!(s.api_key.as_ref().map(|k| k.expose()), Some("txp_sekrit"));
        assert!(!format!("{s:?}").contains("sekrit"), "Debug of the settings redacts the key");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = with_env(&[("TXPIPE_NAMESPACE", "Bad Name")]).unwrap_err();
        assert!(err.contains("TXPIPE_NAMESPACE"), "{err}");
        let err = with_env(&[("TXPIPE_STORAGE", "s3")]).unwrap_err();
        assert!(err.to_lowercase().contains("storage"), "{err}");
        let err = with_env(&[("TXPIPE_PREFETCH", "0")]).unwrap_err();
        assert!(err.contains("TXPIPE_PREFETCH"), "{err}");
        let err = with_env(&[("TXPIPE_RATE_BURST", "0")]).unwrap_err();
        assert!(err.contains("TXPIPE_RATE_BURST"), "{err}");
        let err = with_env(&[("TXPIPE_AUTH", "basic")]).unwrap_err();
        assert!(err.to_lowercase().contains("auth"), "{err}");
        let err = with_env(&[("TXPIPE_MAX_UPLOADS_IN_FLIGHT", "0")]).unwrap_err();
        assert!(err.contains("TXPIPE_MAX_UPLOADS_IN_FLIGHT"), "{err}");
        let err = with_env(&[("TXPIPE_BODY_IDLE_TIMEOUT_MS", "soon")]).unwrap_err();
        assert!(err.to_lowercase().contains("body_idle_timeout_ms"), "{err}");
        let err = with_env(&[("TXPIPE_METRICS_ADDR", "nowhere")]).unwrap_err();
        assert!(err.to_lowercase().contains("metrics_addr"), "{err}");
        let cap = crate::status::MAX_RECORDED_ERRORS;
        let err = with_env(&[("TXPIPE_MAX_REPORTED_ERRORS", &(cap + 1).to_string())]).unwrap_err();
        assert!(err.contains("TXPIPE_MAX_REPORTED_ERRORS") && err.contains(&format!("at most {cap}")), "{err}");
        assert_eq!(with_env(&[("TXPIPE_MAX_REPORTED_ERRORS", &cap.to_string())]).unwrap().max_reported_errors, cap);
        let err = with_env(&[("TXPIPE_INLINE_MAX_BYTES", "1048577")]).unwrap_err();
        assert!(err.contains("TXPIPE_INLINE_MAX_BYTES"), "{err}");
        assert_eq!(with_env(&[("TXPIPE_INLINE_MAX_BYTES", "0")]).unwrap().inline_max_bytes, 0, "0: never");
        let err = with_env(&[("TXPIPE_PREFETCHH", "3")]).unwrap_err();
        assert!(err.contains("unknown setting TXPIPE_PREFETCHH"), "a misspelt setting is named: {err}");
        let err = with_env(&[("TXPIPE_DELIVERY_LIMIT", "abc")]).unwrap_err();
        assert!(err.starts_with("invalid setting TXPIPE_DELIVERY_LIMIT: "), "named as the user set it: {err}");
    }

    #[test]
    fn the_scripts_own_variables_are_passed_over() {
        let s = with_env(&[
            ("TXPIPE_CACHE_DIR", "/somewhere"),
            ("TXPIPE_MOTO_PORT", "6000"),
            ("TXPIPE_API_FUZZ_SECONDS", "600"),
            ("TXPIPE_TEST_STORAGE", "aws"),
            ("TXPIPE_NAMESPACE", "acme"),
        ])
        .unwrap();
        assert_eq!(s.namespace, "acme");
        let err = with_env(&[("TXPIPE_CACHE_DIRS", "/somewhere")]).unwrap_err();
        assert!(err.to_lowercase().contains("cache_dirs"), "only those exact names: {err}");
    }
}
