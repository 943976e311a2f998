//! The S3/DynamoDB-compatible server the tests use: moto_server, installed and started by
//! `scripts/ensure-moto` on first use, and an SDK configuration pointing at it.

use std::sync::OnceLock;
use txpipe_common::storage::Storage;
use txpipe_common::Settings;

static ENDPOINT: OnceLock<String> = OnceLock::new();
static AUTH_ENDPOINT: OnceLock<String> = OnceLock::new();

fn ensure(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ensure-moto");
    let out = std::process::Command::new(script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed: moto_server is needed for the aws tests");
    String::from_utf8(out.stdout).unwrap().lines().last().expect("the endpoint line").trim().to_owned()
}

/// The moto endpoint, starting moto (and installing it) if needed.
pub fn endpoint() -> &'static str {
    ENDPOINT.get_or_init(|| ensure(&[]))
}

/// A moto that checks credentials (it knows none of ours), for tests of wrong credentials.
pub fn auth_endpoint() -> &'static str {
    AUTH_ENDPOINT.get_or_init(|| ensure(&["--auth"]))
}

/// An SDK configuration for moto: its endpoint, dummy credentials, us-east-1.
pub async fn sdk_config(settings: &Settings) -> aws_config::SdkConfig {
    sdk_config_at(settings, endpoint()).await
}

/// The same, for a given endpoint (e.g. a fault-injecting proxy in front of moto).
pub async fn sdk_config_at(settings: &Settings, endpoint: &str) -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .operation_timeout(std::time::Duration::from_millis(settings.aws_operation_timeout_ms))
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "test", None, None, "txpipe-tests"))
        .timeout_config(timeouts)
        .load()
        .await
}

/// Provisions the namespace of `settings` on moto (bucket, tables, topology) and opens it.
pub async fn provisioned(settings: &Settings) -> (aws_config::SdkConfig, Storage) {
    provisioned_at(settings, endpoint()).await
}

/// A namespace of its own for one test on moto: a temporary data directory, settings for S3
/// and DynamoDB there, provisioned. [`teardown`] removes the bucket and tables again.
pub async fn fresh() -> (tempfile::TempDir, Settings, aws_config::SdkConfig, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = crate::test_settings(dir.path());
    settings.storage = txpipe_common::config::StorageKind::Aws;
    let (sdk, storage) = provisioned(&settings).await;
    (dir, settings, sdk, storage)
}

/// An upload as the gateway records it before the broker confirms it (unannounced, by
/// `owner`), created in `store`: the record, and the copy of it the store has a message carry
/// (`file.uploaded`'s `stored`).
pub async fn recorded_upload(
    store: &dyn txpipe_common::storage::StatusStore,
    owner: Option<&str>,
) -> (txpipe_common::status::StatusRecord, txpipe_common::status::StoredRecord) {
    let file_id = txpipe_common::FileId::new();
    let mut record = txpipe_common::status::StatusRecord::uploaded(
        file_id,
        format!("uploads/{file_id}.csv"),
        10,
        chrono::Utc::now(),
    );
    record.announced = false;
    record.uploaded_by = owner.map(str::to_owned);
    store.create(&record).await.unwrap();
    let stored = store.stored(file_id).expect("DynamoDB keeps what it wrote");
    (record, stored)
}

/// The same, through a given endpoint.
pub async fn provisioned_at(settings: &Settings, endpoint: &str) -> (aws_config::SdkConfig, Storage) {
    let sdk = sdk_config_at(settings, endpoint).await;
    txpipe_cli::provision::provision(settings, Some(&sdk)).await.expect("provision on moto");
    let storage = Storage::aws(&sdk, settings);
    storage.check().await.expect("provisioned storage answers");
    (sdk, storage)
}

/// Removes what [`provisioned`] made.
pub async fn teardown(settings: &Settings, sdk: &aws_config::SdkConfig) {
    txpipe_cli::provision::teardown(settings, Some(sdk)).await.expect("teardown on moto");
}
