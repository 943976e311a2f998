//! The CSV contract's size limits, end to end on whichever backend `TXPIPE_TEST_STORAGE` names
//! (scripts/test runs this file on both): what the validator accepts is stored and paged, one
//! byte over is refused with an error that names the limit, and a status record with as many
//! errors as the settings allow is stored whole. Also, on moto: DynamoDB refusing an item is a
//! permanent failure, never retried.

use std::time::Duration;
use txpipe_common::csv_schema::{MAX_FIELD_BYTES, MAX_ROW_BYTES, MAX_TRANSACTION_ID_BYTES};
use txpipe_common::status::{FileStatus, MAX_RECORDED_ERRORS, MAX_STATUS_RECORD_BYTES};
use txpipe_tests::TestFleet;

const HEADER: &str = "transaction_id,amount,currency,timestamp,merchant,status,note\n";
const QUIET: Duration = Duration::from_millis(300);

/// An id of exactly `bytes` bytes, mostly two-byte characters (limits count bytes, not
/// characters), ending in `tag` so ids differ and sort by it.
fn id_of(bytes: usize, tag: char) -> String {
    let mut id = "é".repeat((bytes - 1) / 2);
    id.push_str(&"x".repeat(bytes - 1 - id.len()));
    id.push(tag);
    assert_eq!(id.len(), bytes);
    id
}

/// A row whose id, merchant and note are given, the rest fixed.
fn row(id: &str, merchant: &str, note: &str) -> String {
    format!("{id},1.50,EUR,2024-01-15T10:30:00Z,{merchant},pending,{note}\n")
}

/// The note that makes a row with this id and merchant exactly `bytes` long (fields and commas).
fn note_for(id: &str, merchant: &str, bytes: usize) -> String {
    let without_note = row(id, merchant, "").len() - 1;
    "n".repeat(bytes - without_note)
}

#[tokio::test]
async fn ids_at_the_limit_are_stored_and_paged_one_row_at_a_time() {
    let fleet = TestFleet::spawn().await;
    let merchant = "m".repeat(MAX_FIELD_BYTES);
    let ids: Vec<String> = ['a', 'b', 'c', 'd'].into_iter().map(|t| id_of(MAX_TRANSACTION_ID_BYTES, t)).collect();
    let mut body = String::from(HEADER);
    for id in &ids {
        body.push_str(&row(id, &merchant, &note_for(id, &merchant, MAX_ROW_BYTES)));
    }
    let file_id = fleet.upload(body).await.file_id;
    let record = fleet.wait_for_status(file_id, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!(record.status, FileStatus::Completed, "{record:#?}");
    assert_eq!(record.records_processed, Some(4));

    // one row a page: every cursor is the hex of an id at the limit, and each one works
    let first = fleet.get_ok(&format!("/files/{file_id}/transactions?limit=1")).await;
    let cursor = first["next_cursor"].as_str().expect("more pages");
    assert_eq!(cursor.len(), 2 * MAX_TRANSACTION_ID_BYTES);
    let rows = fleet.transactions(file_id, 1).await;
    let got: Vec<&str> = rows.iter().map(|t| t.transaction_id.as_str()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>(), "every row, in id order, none twice");
    assert!(rows.iter().all(|t| t.merchant == merchant && t.amount.to_string() == "1.50"));
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn one_byte_over_a_limit_is_refused_with_an_error_naming_it() {
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    let long_id = id_of(MAX_TRANSACTION_ID_BYTES + 1, 'a');
    let long_merchant = "m".repeat(MAX_FIELD_BYTES + 1);
    let body = format!(
        "{HEADER}{}{}{}{}",
        row(&long_id, "m", ""),
        row("t-2", &long_merchant, ""),
        row("t-3", "m", &note_for("t-3", "m", MAX_ROW_BYTES + 1)),
        row(&id_of(MAX_TRANSACTION_ID_BYTES, 'z'), "m", ""),
    );
    let file_id = fleet.upload(body).await.file_id;
    let record = fleet.wait_for_status(file_id, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!(record.status, FileStatus::ValidationFailed, "{record:#?}");
    assert_eq!((record.row_count, record.error_count), (Some(4), Some(3)));
    let errors: Vec<(u64, Option<&str>, &str)> =
        record.errors.iter().map(|e| (e.row, e.column.as_deref(), e.message.as_str())).collect();
    let expect = [
        (1, Some("transaction_id"), "is 257 bytes long; the limit is 256 bytes"),
        (2, Some("merchant"), "is 1025 bytes long; the limit is 1024 bytes"),
        (3, None, "the row is 8193 bytes long (its fields and the commas between them); the limit is 8192 bytes"),
    ];
    assert_eq!(errors.len(), expect.len(), "{errors:?}");
    for ((row, column, message), (want_row, want_column, want)) in errors.iter().zip(expect) {
        assert_eq!((*row, *column), (want_row, want_column));
        assert!(message.contains(want), "row {row}: {message:?} lacks {want:?}");
        assert!(message.len() < 200, "a value is quoted short: {message}");
    }
    assert!(record.reason.as_deref().unwrap_or_default().contains("is 257 bytes long"), "{:?}", record.reason);
    let n = tap.next(Duration::from_secs(10)).await.expect("a notification");
    assert_eq!((n.routing_key.as_str(), n.body.error_count), ("file.rejected", 3));
    assert!(fleet.transactions(file_id, 10).await.is_empty(), "nothing of a refused file is stored");
    assert!(tap.drain(QUIET).await.is_empty());
    assert_eq!(fleet.dlq_count().await, 0, "refused, not dead-lettered");
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_status_with_the_most_errors_allowed_is_stored_whole() {
    let fleet = TestFleet::spawn_with(|s| s.max_reported_errors = MAX_RECORDED_ERRORS).await;
    // every row wrong in every column it can be, each wrong value as long as a field may be
    let junk = "\u{1}\\é".repeat(MAX_FIELD_BYTES / 8);
    let mut body = String::from(HEADER);
    for i in 0..1000 {
        body.push_str(&format!("t{i},{junk},{junk},{junk},m,{junk},\n"));
    }
    let file_id = fleet.upload(body).await.file_id;
    let record = fleet.wait_for_status(file_id, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!(record.status, FileStatus::ValidationFailed, "{record:#?}");
    assert_eq!(record.error_count, Some(4000), "every error counted");
    assert_eq!(record.errors.len(), MAX_RECORDED_ERRORS, "as many kept as the setting says");
    assert!(record.errors.iter().all(|e| e.message.len() < 200), "values are quoted short");
    let (_, raw) = fleet.get_json(&format!("/files/{file_id}")).await;
    let size = serde_json::to_vec(&raw).unwrap().len();
    assert!(size < MAX_STATUS_RECORD_BYTES, "the record is {size} bytes");
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}

/// Whatever the validator lets through, DynamoDB may still refuse an item (a future field, a
/// bug): that answer is the same every time, so it must fail at once, never be retried.
#[tokio::test]
async fn dynamodb_refusing_an_item_is_a_permanent_failure() {
    use txpipe_common::storage::{StorageClass, Transaction};
    let (_dir, settings, sdk, storage) = txpipe_tests::aws::fresh().await;
    let ts = chrono::DateTime::parse_from_rfc3339("2024-01-15T10:30:00Z").unwrap();
    let tx = |id: String, merchant: String| Transaction {
        transaction_id: id,
        amount: rust_decimal::Decimal::ONE,
        currency: "USD".into(),
        timestamp: ts,
        timestamp_epoch: ts.timestamp(),
        merchant,
        status: txpipe_common::csv_schema::TxStatus::Completed,
        file_id: txpipe_common::FileId::new(),
        processed_at: chrono::Utc::now(),
        version: 1,
        replaces: None,
    };
    let cases = [
        ("an item over 400 KB", tx("big".into(), "m".repeat(500 * 1024))),
        ("a key over 2048 bytes", tx("k".repeat(3000), "m".into())),
    ];
    for (what, t) in cases {
        let err = storage.transactions.write(std::slice::from_ref(&t)).await.expect_err(what);
        assert_eq!(err.class(), StorageClass::Permanent, "{what}: {err:#}");
        let failure = txpipe_common::worker::Failure::storage("writing transactions", &err);
        assert!(matches!(failure, txpipe_common::worker::Failure::DeadLetter(_)), "{what}: {failure:?}");
    }
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}
