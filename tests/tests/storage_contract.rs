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
async fn sqlite_transaction_store_meets_the_contract() {
    let (_dir, s) = local().await;
    contract::transaction_store(s.transactions).await;
}

#[tokio::test]
async fn two_processes_worth_of_connections_share_one_database() {
    // two independent opens of the same file, as two worker processes would have
    let dir = tempfile::tempdir().unwrap();
    let settings = txpipe_tests::test_settings(dir.path());
    let a = Storage::open(&settings).await.unwrap();
    let b = Storage::open(&settings).await.unwrap();
    let id = txpipe_common::messages::FileId::new();
    let rec = txpipe_common::status::StatusRecord::uploaded(id, "k".into(), 1, chrono::Utc::now());
    a.statuses.create(&rec).await.unwrap();
    assert_eq!(b.statuses.get(id).await.unwrap(), Some(rec));
    let _: Arc<dyn txpipe_common::storage::StatusStore> = b.statuses;
}
