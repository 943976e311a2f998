//! The storage contract suites against the embedded adapters (local directory, SQLite).

use std::sync::Arc;
use txpipe_common::storage::Storage;
use txpipe_tests::contract;

async fn local() -> (tempfile::TempDir, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let settings = txpipe_tests::test_settings(dir.path());
    let storage = Storage::open(&settings).await.unwrap();
    (dir, storage)
}

/// Two independent opens of the same data directory, as two processes of a split deployment on
/// one host would have.
async fn two_opens() -> (tempfile::TempDir, Storage, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let settings = txpipe_tests::test_settings(dir.path());
    let a = Storage::open(&settings).await.unwrap();
    let b = Storage::open(&settings).await.unwrap();
    (dir, a, b)
}

#[tokio::test]
async fn local_object_store_meets_the_contract() {
    let (_dir, s) = local().await;
    contract::object_store(s.objects).await;
}

#[tokio::test]
async fn sqlite_status_store_meets_the_contract() {
    let (_dir, s) = local().await;
    contract::status_store(s.statuses).await;
}

#[tokio::test]
async fn sqlite_status_store_shared_by_two_processes_meets_the_contract() {
    let (_dir, a, b) = two_opens().await;
    contract::status_store_two_processes(a.statuses, b.statuses).await;
}

#[tokio::test]
async fn sqlite_status_listing_meets_the_contract() {
    let (_dir, s) = local().await;
    contract::status_listing(s.statuses).await;
}

#[tokio::test]
async fn a_status_table_from_before_the_listing_gets_its_columns_and_keeps_its_files() {
    // a database as an older txpipe left it: the status table without the listing columns
    let dir = tempfile::tempdir().unwrap();
    let settings = txpipe_tests::test_settings(dir.path());
    let layout = txpipe_common::storage::local::LocalLayout::of(&settings);
    std::fs::create_dir_all(layout.database().parent().unwrap()).unwrap();
    let mut old =
        txpipe_common::status::StatusRecord::uploaded(txpipe_common::FileId::new(), "k".into(), 1, chrono::Utc::now());
    old.uploaded_by = Some("old-key".into());
    let db = rusqlite::Connection::open(layout.database()).unwrap();
    let table = settings.names().status_table();
    db.execute_batch(&format!(
        "CREATE TABLE \"{table}\" (file_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at TEXT NOT NULL,
            record TEXT NOT NULL) WITHOUT ROWID"
    ))
    .unwrap();
    let insert = format!("INSERT INTO \"{table}\" VALUES (?1, 'uploaded', 'x', ?2)");
    db.execute(&insert, (old.file_id.to_string(), serde_json::to_string(&old).unwrap())).unwrap();
    drop(db);
    let s = Storage::open(&settings).await.unwrap();
    let q = txpipe_common::storage::FileQuery {
        owner: Some("old-key".into()),
        status: None,
        since: None,
        limit: 10,
        cursor: None,
    };
    assert_eq!(s.statuses.list(&q).await.unwrap().items, vec![old]);
}

#[tokio::test]
async fn sqlite_transaction_store_meets_the_contract() {
    let (_dir, s) = local().await;
    contract::transaction_store(s.transactions).await;
}

#[tokio::test]
async fn a_versions_table_from_before_becomes_a_view_and_keeps_every_version() {
    use txpipe_common::storage::WriteOutcome;
    let dir = tempfile::tempdir().unwrap();
    let settings = txpipe_tests::test_settings(dir.path());
    let names = settings.names();
    let (f1, f2) = (txpipe_common::FileId::new(), txpipe_common::FileId::new());
    let p = uuid::Uuid::new_v4().simple().to_string();
    let rows: Vec<_> = (0..3).map(|i| contract::tx(&format!("{p}-{i}"), f1, "1")).collect();
    let v2 = contract::tx(&format!("{p}-1"), f2, "2").replacing(&rows[1]);
    {
        let s = Storage::open(&settings).await.unwrap();
        assert_eq!(s.transactions.write(&rows).await.unwrap(), WriteOutcome::Written);
        assert_eq!(s.transactions.write(std::slice::from_ref(&v2)).await.unwrap(), WriteOutcome::Written);
    }
    // the database as an older txpipe left it: every version in the versions table, a table
    // (the current ones a second time), and neither the earlier versions' table nor the index
    let q = |t: String| format!("\"{t}\"");
    let (tt, vt, et) = (
        q(names.transactions_table()),
        q(names.transaction_versions_table()),
        q(names.transaction_earlier_versions_table()),
    );
    let cols = "file_id, transaction_id, amount, currency, timestamp, timestamp_epoch, merchant, status, \
                processed_at, version, replaces_file, replaces_version";
    let db = rusqlite::Connection::open(txpipe_common::storage::local::LocalLayout::of(&settings).database()).unwrap();
    db.execute_batch(&format!(
        "BEGIN;
         DROP VIEW {vt};
         CREATE TABLE {vt} (file_id TEXT NOT NULL, transaction_id TEXT NOT NULL, amount TEXT NOT NULL,
            currency TEXT NOT NULL, timestamp TEXT NOT NULL, timestamp_epoch INTEGER NOT NULL,
            merchant TEXT NOT NULL, status TEXT NOT NULL, processed_at TEXT NOT NULL,
            version INTEGER NOT NULL DEFAULT 1, replaces_file TEXT, replaces_version INTEGER,
            PRIMARY KEY (file_id, transaction_id)) WITHOUT ROWID;
         INSERT INTO {vt} ({cols}) SELECT {cols} FROM {tt} UNION ALL SELECT {cols} FROM {et};
         DROP TABLE {et};
         DROP INDEX \"{}-of-file\";
         COMMIT;",
        names.transactions_table()
    ))
    .unwrap();
    let count =
        |table: &str| db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(count(&vt), 4);

    // two services opening it at once upgrade it once
    let (a, b) = tokio::join!(Storage::open(&settings), Storage::open(&settings));
    let (s, _b) = (a.unwrap(), b.unwrap());
    assert_eq!(s.transactions.list_by_file(f1, 10, None).await.unwrap().items, rows, "f1's rows as f1 wrote them");
    assert_eq!(s.transactions.list_by_file(f2, 10, None).await.unwrap().items, vec![v2.clone()]);
    assert_eq!(s.transactions.current(&[format!("{p}-1")]).await.unwrap(), vec![v2]);
    assert_eq!((count(&vt), count(&et), count(&tt)), (4, 1, 3), "the view lists every version, each kept once");
    // and the ledger goes on from there: reverting f2's version brings back f1's
    s.transactions.revert(f2, &format!("{p}-1")).await.unwrap();
    assert_eq!(s.transactions.current(&[format!("{p}-1")]).await.unwrap(), vec![rows[1].clone()]);
    assert_eq!((count(&vt), count(&et)), (3, 0));
}

#[tokio::test]
async fn sqlite_rows_and_a_status_change_are_one_write() {
    let (_dir, s) = local().await;
    assert!(contract::write_then(s.transactions, s.statuses).await, "the embedded store makes both at once");
}

#[tokio::test]
async fn sqlite_api_key_store_meets_the_contract() {
    let (_dir, s) = local().await;
    contract::api_key_store(s.keys).await;
}

#[tokio::test]
async fn sqlite_idempotency_store_meets_the_contract() {
    let (_dir, s) = local().await;
    contract::idempotency_store(s.idempotency).await;
}

#[tokio::test]
async fn two_processes_worth_of_connections_share_one_database() {
    let (_dir, a, b) = two_opens().await;
    let id = txpipe_common::FileId::new();
    let rec = txpipe_common::status::StatusRecord::uploaded(id, "k".into(), 1, chrono::Utc::now());
    a.statuses.create(&rec).await.unwrap();
    assert_eq!(b.statuses.get(id).await.unwrap(), Some(rec));
    let _: Arc<dyn txpipe_common::storage::StatusStore> = b.statuses;
}

/// Settings for the aws backend with a fresh namespace.
fn aws_settings(dir: &tempfile::TempDir) -> txpipe_common::Settings {
    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.storage = txpipe_common::config::StorageKind::Aws;
    // small parts, so the large-object case goes through a real multipart upload
    settings.s3_multipart_threshold_bytes = 5 * 1024 * 1024;
    settings.s3_part_size_bytes = 5 * 1024 * 1024;
    settings
}

/// The same suites against S3 and DynamoDB on moto (started by the harness if needed).
async fn on_moto(
    tweak: impl FnOnce(&mut txpipe_common::Settings),
) -> (tempfile::TempDir, txpipe_common::Settings, aws_config::SdkConfig, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = aws_settings(&dir);
    tweak(&mut settings);
    let (sdk, storage) = txpipe_tests::aws::provisioned(&settings).await;
    (dir, settings, sdk, storage)
}

#[tokio::test]
async fn s3_object_store_meets_the_contract() {
    let (_dir, settings, sdk, s) = on_moto(|_| {}).await;
    contract::object_store(s.objects).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn s3_with_server_side_encryption_meets_the_contract() {
    let (_dir, settings, sdk, s) = on_moto(|s| s.s3_sse = Some("AES256".into())).await;
    contract::object_store(s.objects).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn dynamodb_status_store_meets_the_contract() {
    let (_dir, settings, sdk, s) = on_moto(|_| {}).await;
    contract::status_store(s.statuses).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn dynamodb_status_store_shared_by_two_processes_meets_the_contract() {
    let (_dir, settings, sdk, a) = on_moto(|_| {}).await;
    let b = Storage::aws(&sdk, &settings);
    contract::status_store_two_processes(a.statuses, b.statuses).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn dynamodb_status_listing_meets_the_contract() {
    let (_dir, settings, sdk, s) = on_moto(|_| {}).await;
    contract::status_listing(s.statuses).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn dynamodb_transaction_store_meets_the_contract() {
    let (_dir, settings, sdk, s) = on_moto(|_| {}).await;
    contract::transaction_store(s.transactions).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn dynamodb_rows_and_a_status_change_are_two_writes() {
    let (_dir, settings, sdk, s) = on_moto(|_| {}).await;
    assert!(!contract::write_then(s.transactions, s.statuses).await, "DynamoDB leaves the change to the caller");
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn dynamodb_api_key_store_meets_the_contract() {
    let (_dir, settings, sdk, s) = on_moto(|_| {}).await;
    contract::api_key_store(s.keys).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn dynamodb_idempotency_store_meets_the_contract() {
    let (_dir, settings, sdk, s) = on_moto(|_| {}).await;
    contract::idempotency_store(s.idempotency).await;
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}

#[tokio::test]
async fn a_missing_bucket_or_table_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let settings = aws_settings(&dir);
    let sdk = txpipe_tests::aws::sdk_config(&settings).await;
    let storage = Storage::aws(&sdk, &settings);
    let err = storage.check().await.unwrap_err().to_string();
    assert!(err.contains(&settings.names().bucket()), "{err}");
    assert!(err.contains("txpipe provision"), "{err}");
    let err = storage.statuses.check().await.unwrap_err().to_string();
    assert!(err.contains(&settings.names().status_table()) && err.contains("txpipe provision"), "{err}");
    let err = storage.keys.check().await.unwrap_err().to_string();
    assert!(err.contains(&settings.names().api_keys_table()) && err.contains("txpipe provision"), "{err}");
    let err = storage.idempotency.check().await.unwrap_err().to_string();
    assert!(err.contains(&settings.names().idempotency_table()) && err.contains("txpipe provision"), "{err}");
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let settings = aws_settings(&dir);
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(txpipe_tests::aws::auth_endpoint())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("wrong", "wrong", None, None, "test"))
        .load()
        .await;
    let storage = Storage::aws(&sdk, &settings);
    for err in [storage.objects.check().await.unwrap_err(), storage.statuses.check().await.unwrap_err()] {
        assert_eq!(err.kind(), txpipe_common::storage::StorageErrorKind::Misconfigured, "{err}");
        assert!(err.to_string().contains("check the AWS credentials"), "{err}");
    }
    let err = txpipe_cli::provision::provision(&settings, Some(&sdk)).await.unwrap_err().to_string();
    assert!(err.contains("check the AWS credentials"), "provision says so too: {err}");
}

/// A carried record is client input: a version at the top of its range, JSON that is not a
/// record, or another file's record, never panic the worker; each is a refused base or none.
#[tokio::test]
async fn a_malformed_carried_record_is_only_a_refused_base() {
    use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate, StoredRecord};
    use txpipe_common::storage::{Advance, Storage};
    use txpipe_common::FileId;
    let (_dir, settings, sdk, gateway) = txpipe_tests::aws::fresh().await;
    let (record, real) = txpipe_tests::aws::recorded_upload(gateway.statuses.as_ref(), None).await;
    let file_id = record.file_id;
    let other = StatusRecord::uploaded(FileId::new(), "uploads/other.csv".into(), 1, chrono::Utc::now());
    let hostile = [
        StoredRecord { version: u64::MAX, json: real.json.clone() },
        StoredRecord { version: 1, json: "{\"not\": \"a record\"".into() },
        StoredRecord { version: 1, json: serde_json::to_string(&other).unwrap() },
        StoredRecord { version: 1, json: "x".repeat(1024 * 1024) },
    ];
    for (i, stored) in hostile.into_iter().enumerate() {
        let worker = Storage::aws(&sdk, &settings);
        worker.statuses.hint(file_id, stored);
        // each a step forward (and announced, so a carried base would be used)
        let to = [FileStatus::Validating, FileStatus::Validated, FileStatus::Processing, FileStatus::Processed][i];
        let step: txpipe_common::storage::Change = std::sync::Arc::new(move |r: &mut StatusRecord| {
            r.announced = true;
            r.advance(to, StatusUpdate::default(), chrono::Utc::now())
        });
        match worker.statuses.update(file_id, step).await.unwrap() {
            Advance::Moved(r) => assert_eq!(r.status, to, "hostile copy {i}"),
            refused => panic!("hostile copy {i}: the change is made on the real record: {refused:?}"),
        }
    }
    let now = gateway.statuses.get(file_id).await.unwrap().unwrap();
    assert_eq!((now.status, now.file_id), (FileStatus::Processed, file_id));
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}
