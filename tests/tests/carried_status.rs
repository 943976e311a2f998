//! A status record carried in a stage message ([`StoredRecord`]) on S3/DynamoDB (moto): a
//! worker in another process claims the file on it without reading the record first, and a
//! stale or forged copy changes nothing it should not: it costs one refused write, whose
//! answer is the item as it is. Alone in its test binary, because it counts this process's own
//! `txpipe_storage_calls_total`.

use std::sync::Arc;
use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate, StoredRecord};
use txpipe_common::storage::{Advance, Change, Storage};

/// This process's DynamoDB calls of `operation` so far.
fn calls(operation: &str) -> f64 {
    let series = format!("txpipe_storage_calls_total{{operation=\"{operation}\",service=\"dynamodb\"}} ");
    txpipe_common::metrics::render()
        .lines()
        .find_map(|l| l.strip_prefix(&series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The DynamoDB reads and writes a step made: (GetItem, PutItem).
async fn counted<T>(step: impl std::future::Future<Output = T>) -> (T, f64, f64) {
    let (gets, puts) = (calls("GetItem"), calls("PutItem"));
    let out = step.await;
    (out, calls("GetItem") - gets, calls("PutItem") - puts)
}

fn change(f: impl Fn(&mut StatusRecord) -> bool + Send + Sync + 'static) -> Change {
    Arc::new(f)
}

#[tokio::test]
async fn a_claim_on_a_carried_record_needs_no_read_and_a_forged_one_changes_nothing() {
    let (_dir, settings, sdk, gateway) = txpipe_tests::aws::fresh().await;

    // the gateway records an upload and carries the record in its file.uploaded
    let (record, carried) = txpipe_tests::aws::recorded_upload(gateway.statuses.as_ref(), Some("alice")).await;
    let file_id = record.file_id;
    assert_eq!(carried.version, 1);

    // a validator in another process claims it on the carried record: one write, no read
    let validator = Storage::aws(&sdk, &settings);
    validator.statuses.hint(file_id, carried);
    let claim = change(|r| {
        r.advance(FileStatus::Validating, StatusUpdate::default(), chrono::Utc::now()) && {
            r.announced = true;
            true
        }
    });
    let (claimed, gets, puts) = counted(validator.statuses.update(file_id, claim)).await;
    assert!(matches!(claimed.unwrap(), Advance::Moved(r) if r.status == FileStatus::Validating));
    assert_eq!((gets, puts), (0.0, 1.0), "the claim is one conditional write on the carried record");
    let now = gateway.statuses.get(file_id).await.unwrap().unwrap();
    assert_eq!((now.status, now.announced), (FileStatus::Validating, true));

    // a forged copy of the current record (another tenant's name in it, the right version)
    let real = validator.statuses.stored(file_id).unwrap();
    let mut forged: StatusRecord = serde_json::from_str(&real.json).unwrap();
    forged.uploaded_by = Some("mallory".into());
    let forged = StoredRecord { version: real.version, json: serde_json::to_string(&forged).unwrap() };
    let other = Storage::aws(&sdk, &settings);
    other.statuses.hint(file_id, forged);
    let validated = change(|r| r.advance(FileStatus::Validated, StatusUpdate::default(), chrono::Utc::now()));
    let (moved, gets, puts) = counted(other.statuses.update(file_id, validated)).await;
    let moved = match moved.unwrap() {
        Advance::Moved(r) => r,
        refused => panic!("the change is made on the real record: {refused:?}"),
    };
    assert_eq!(moved.uploaded_by.as_deref(), Some("alice"), "nothing of the forged copy is kept");
    assert_eq!((gets, puts), (0.0, 2.0), "the forged base is refused, and the refusal brings the real item");
    let now = gateway.statuses.get(file_id).await.unwrap().unwrap();
    assert_eq!((now.status, now.uploaded_by.as_deref()), (FileStatus::Validated, Some("alice")));

    // a stale copy (the version before) is refused the same way
    let stale = StoredRecord { version: 1, json: serde_json::to_string(&record).unwrap() };
    let late = Storage::aws(&sdk, &settings);
    late.statuses.hint(file_id, stale);
    let processing = change(|r| r.advance(FileStatus::Processing, StatusUpdate::default(), chrono::Utc::now()));
    let (moved, _, _) = counted(late.statuses.update(file_id, processing)).await;
    assert!(matches!(moved.unwrap(), Advance::Moved(r) if r.status == FileStatus::Processing && r.announced));

    txpipe_tests::aws::teardown(&settings, &sdk).await;
}
