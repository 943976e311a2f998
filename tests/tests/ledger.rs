//! The ledger rules, end to end over HTTP (on both backends: `scripts/test` runs this file
//! again on S3 and DynamoDB): a transaction id is one transaction across files; the same
//! values are stored once, other values refuse the file (or, asked for, become a new version
//! with the earlier kept, never over another tenant's); two files racing with conflicting rows
//! end with exactly one stored; partial mode stores the valid rows and reports the others.

use serde_json::Value;
use std::time::Duration;
use txpipe_common::status::FileStatus;
use txpipe_common::FileId;
use txpipe_tests::{TestFleet, UNLIMITED};

const HEADER: &str = "transaction_id,amount,currency,timestamp,merchant,status\n";

fn row(id: &str, amount: &str, merchant: &str) -> String {
    format!("{id},{amount},USD,2024-01-15T10:30:00Z,{merchant},completed\n")
}

/// Uploads with `key` at `path` (`/upload?...`) and returns the new file's id.
async fn upload_at(fleet: &TestFleet, key: &str, path: &str, body: String) -> FileId {
    let resp = fleet
        .request_as(Some(key), reqwest::Method::POST, path)
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 202, "{v}");
    v["file_id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn one_transaction_id_is_one_transaction_across_files() {
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    let (alice, mallory) =
        (fleet.new_key("alice", false, UNLIMITED).await, fleet.new_key("mallory", false, UNLIMITED).await);
    let a = upload_at(
        &fleet,
        &alice,
        "/upload",
        format!("{HEADER}{}{}", row("t-1", "1.00", "Shop"), row("t-2", "2", "Shop")),
    )
    .await;
    fleet.wait_for_status(a, &[FileStatus::Completed]).await;

    // the same values again, from another file: stored once, counted as already stored
    let same = upload_at(
        &fleet,
        &alice,
        "/upload",
        format!("{HEADER}{}{}", row("t-1", "1.0", "Shop"), row("t-3", "3", "Shop")),
    )
    .await;
    let done = fleet.wait_for_status(same, &[FileStatus::Completed]).await;
    assert_eq!((done.records_processed, done.already_stored), (Some(1), Some(1)), "{done:?}");
    let listed: Vec<_> = fleet.transactions(same, 10).await.into_iter().map(|t| t.transaction_id).collect();
    assert_eq!(listed, ["t-3"], "a file lists the rows it contributed");

    // other values: refused in validation, one error per such row, naming columns and file
    let evil = upload_at(
        &fleet,
        &mallory,
        "/upload",
        format!("{HEADER}{}{}{}", row("t-1", "999.00", "Evil"), row("t-9", "9", "Evil"), row("t-2", "2", "Shop")),
    )
    .await;
    let refused = fleet.wait_for_status(evil, &[FileStatus::ValidationFailed, FileStatus::Completed]).await;
    assert_eq!(refused.status, FileStatus::ValidationFailed, "{refused:?}");
    assert_eq!(refused.error_count, Some(1));
    let e = &refused.errors[0];
    assert_eq!((e.row, e.column.as_deref()), (1, Some("amount")));
    assert!(e.message.contains("amount") && e.message.contains("merchant"), "{}", e.message);
    assert!(e.message.contains(&a.to_string()), "names the file that stored it: {}", e.message);
    assert!(!e.message.contains("1.00"), "another tenant's values are not shown: {}", e.message);
    assert!(fleet.transactions(evil, 10).await.is_empty(), "nothing of a refused file is stored");

    // the first file's rows are untouched, and it lists exactly what it stored
    let mine = fleet.transactions(a, 10).await;
    assert_eq!(mine.len() as u64, 2);
    assert_eq!((mine[0].amount.to_string().as_str(), mine[0].merchant.as_str()), ("1.00", "Shop"));
    let (code, t1) = fleet.get_as(Some(&alice), "/transactions/t-1").await;
    assert_eq!(code, 200, "{t1}");
    assert_eq!((t1["amount"].as_str(), t1["file_id"].as_str()), (Some("1.00"), Some(a.to_string().as_str())));
    assert_eq!(t1["earlier_versions"], serde_json::json!([]));
    // a transaction is not shown to other tenants, nor one that was never stored
    assert_eq!(fleet.get_as(Some(&mallory), "/transactions/t-1").await.0, 404);
    assert_eq!(fleet.get_as(Some(&alice), "/transactions/t-9").await.0, 404);
    assert_eq!(fleet.get_as(None, "/transactions/t-1").await.0, 401);

    let mut keys = Vec::new();
    while let Some(n) = tap.next(Duration::from_secs(5)).await {
        keys.push((n.body.file_id, n.routing_key));
        if keys.len() == 3 {
            break;
        }
    }
    assert!(keys.contains(&(evil, "file.rejected".to_string())), "{keys:?}");
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn an_update_is_a_new_version_and_the_earlier_stays_with_its_file() {
    let fleet = TestFleet::spawn_with(|s| s.allow_upload_on_conflict = true).await;
    let key = fleet.api_key.clone();
    let a = upload_at(&fleet, &key, "/upload", format!("{HEADER}{}", row("t-1", "1.00", "Shop"))).await;
    fleet.wait_for_status(a, &[FileStatus::Completed]).await;
    let b = upload_at(&fleet, &key, "/upload?on_conflict=update", format!("{HEADER}{}", row("t-1", "999.00", "Shop")))
        .await;
    let done = fleet.wait_for_status(b, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!((done.status, done.records_processed), (FileStatus::Completed, Some(1)), "{done:?}");
    let c =
        upload_at(&fleet, &key, "/upload?on_conflict=update", format!("{HEADER}{}", row("t-1", "5", "Other"))).await;
    fleet.wait_for_status(c, &[FileStatus::Completed]).await;

    let t = fleet.get_ok("/transactions/t-1").await;
    assert_eq!((t["amount"].as_str(), t["version"].as_u64()), (Some("5"), Some(3)), "{t}");
    assert_eq!(t["file_id"], c.to_string());
    let earlier: Vec<(String, String)> = t["earlier_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["file_id"].as_str().unwrap().to_owned(), v["amount"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(earlier, [(b.to_string(), "999.00".into()), (a.to_string(), "1.00".into())], "newest first");
    // each file lists the values it wrote
    assert_eq!(fleet.transactions(a, 10).await[0].amount.to_string(), "1.00");
    assert_eq!(fleet.transactions(b, 10).await[0].amount.to_string(), "999.00");

    // a deployment that does not let uploads choose refuses the parameter; bad values are 400
    let strict = TestFleet::spawn().await;
    for path in ["/upload?on_conflict=update", "/upload?on_conflict=maybe", "/upload?mode=some"] {
        let resp = strict
            .request_as(Some(&strict.api_key), reqwest::Method::POST, path)
            .header("content-type", "text/csv")
            .body(format!("{HEADER}{}", row("t-1", "1", "x")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "bad_request", "{v}");
    }
    assert_eq!(strict.object_count().await, 0, "nothing stored for a refused upload");
    strict.shutdown().await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn an_update_never_replaces_another_tenants_transaction() {
    let fleet = TestFleet::spawn_with(|s| s.allow_upload_on_conflict = true).await;
    let (alice, mallory) =
        (fleet.new_key("alice", false, UNLIMITED).await, fleet.new_key("mallory", false, UNLIMITED).await);
    let a = upload_at(&fleet, &alice, "/upload", format!("{HEADER}{}", row("t-1", "1.00", "Shop"))).await;
    fleet.wait_for_status(a, &[FileStatus::Completed]).await;

    // another tenant asking for an update is refused as for a conflict, saying why
    let evil =
        upload_at(&fleet, &mallory, "/upload?on_conflict=update", format!("{HEADER}{}", row("t-1", "0.01", "Evil")))
            .await;
    let refused = fleet.wait_for_status(evil, &[FileStatus::ValidationFailed, FileStatus::Completed]).await;
    assert_eq!(refused.status, FileStatus::ValidationFailed, "{refused:?}");
    let e = &refused.errors[0];
    assert_eq!((e.row, e.column.as_deref()), (1, Some("amount")), "{e:?}");
    assert!(e.message.contains("your own files"), "{}", e.message);
    assert!(fleet.transactions(evil, 10).await.is_empty(), "nothing of a refused file is stored");
    let (code, t1) = fleet.get_as(Some(&alice), "/transactions/t-1").await;
    assert_eq!(code, 200, "the owner still sees its transaction: {t1}");
    assert_eq!((t1["amount"].as_str(), t1["file_id"].as_str()), (Some("1.00"), Some(a.to_string().as_str())));

    // the owner's own update is the next version
    let b = upload_at(&fleet, &alice, "/upload?on_conflict=update", format!("{HEADER}{}", row("t-1", "2.00", "Shop")))
        .await;
    let done = fleet.wait_for_status(b, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!((done.status, done.records_processed), (FileStatus::Completed, Some(1)), "{done:?}");
    let (_, t1) = fleet.get_as(Some(&alice), "/transactions/t-1").await;
    assert_eq!((t1["amount"].as_str(), t1["version"].as_u64()), (Some("2.00"), Some(2)), "{t1}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn of_two_files_racing_with_conflicting_rows_exactly_one_is_stored() {
    // small batches and several files at once in the transformer, so the writes interleave
    let fleet = TestFleet::spawn_with(|s| {
        s.batch_size = 7;
        s.prefetch = 8;
    })
    .await;
    const ROWS: usize = 120;
    for round in 0..3 {
        let ids: Vec<String> = (0..ROWS).map(|i| format!("r{round}-{i:04}")).collect();
        // one file in id order, the other reversed, with other amounts
        let first: String = ids.iter().map(|id| row(id, "1.00", "First")).collect();
        let second: String = ids.iter().rev().map(|id| row(id, "2.00", "Second")).collect();
        let key = fleet.api_key.clone();
        let (x, y) = tokio::join!(
            upload_at(&fleet, &key, "/upload", format!("{HEADER}{first}")),
            upload_at(&fleet, &key, "/upload", format!("{HEADER}{second}")),
        );
        let end = [FileStatus::Completed, FileStatus::ValidationFailed, FileStatus::ProcessingFailed];
        let (rx, ry) = (fleet.wait_for_status(x, &end).await, fleet.wait_for_status(y, &end).await);
        let won: Vec<_> = [&rx, &ry].into_iter().filter(|r| r.status == FileStatus::Completed).collect();
        assert_eq!(won.len(), 1, "exactly one wins: {:?} / {:?}", rx.status, ry.status);
        let (winner, loser) = if rx.status == FileStatus::Completed { (&rx, &ry) } else { (&ry, &rx) };
        assert_eq!(loser.status, FileStatus::ValidationFailed, "{loser:?}");
        assert_eq!(loser.error_count, Some(ROWS as u64), "every conflicting row reported");
        assert_eq!(winner.records_processed, Some(ROWS as u64));
        let stored = fleet.transactions(winner.file_id, 1000).await;
        assert_eq!(stored.len(), ROWS, "never a half-written file");
        assert!(fleet.transactions(loser.file_id, 1000).await.is_empty(), "nothing of the loser stays");
        // the current version of every id is the winner's
        let want = stored[0].amount.to_string();
        for id in [&ids[0], &ids[ROWS / 2], &ids[ROWS - 1]] {
            let t = fleet.get_ok(&format!("/transactions/{id}")).await;
            assert_eq!(
                (t["file_id"].as_str(), t["amount"].as_str()),
                (Some(winner.file_id.to_string().as_str()), Some(want.as_str()))
            );
        }
    }
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn partial_mode_stores_the_valid_rows_and_reports_the_rest() {
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    let key = fleet.api_key.clone();
    let a = upload_at(&fleet, &key, "/upload", format!("{HEADER}{}", row("p-1", "1.00", "Shop"))).await;
    fleet.wait_for_status(a, &[FileStatus::Completed]).await;
    let _ = tap.next(Duration::from_secs(5)).await;

    let body = format!(
        "{HEADER}{}{}{}{}{}{}",
        row("p-2", "2", "Shop"),
        row("p-3", "not-money", "Shop"), // invalid
        row("p-1", "7.00", "Shop"),      // conflicts with the first file
        row("p-2", "2", "Shop"),         // duplicate in the file
        row("p-4", "4", "Shop"),
        row("p-1x", "1", ""), // invalid: empty merchant
    );
    let b = upload_at(&fleet, &key, "/upload?mode=partial", body).await;
    let done = fleet.wait_for_status(b, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!(done.status, FileStatus::Completed, "{done:?}");
    assert_eq!(done.row_count, Some(6));
    assert_eq!(done.records_processed, Some(2), "p-2 and p-4");
    assert_eq!(done.rejected_rows, Some(4), "{done:?}");
    let rows: Vec<u64> = done.errors.iter().map(|e| e.row).collect();
    assert_eq!(rows, [2, 3, 4, 6], "one or more errors per refused row, in row order: {:?}", done.errors);
    let stored: Vec<_> = fleet.transactions(b, 10).await.into_iter().map(|t| t.transaction_id).collect();
    assert_eq!(stored, ["p-2", "p-4"]);
    assert_eq!(fleet.transactions(a, 10).await[0].amount.to_string(), "1.00", "the conflict changed nothing");

    let n = tap.next(Duration::from_secs(10)).await.expect("a notification");
    assert_eq!((n.routing_key.as_str(), n.body.file_id), ("file.completed", b));
    assert_eq!((n.body.records_processed, n.body.rejected_rows), (2, 4));

    // a file with no valid row is rejected, partial or not
    let none = upload_at(&fleet, &key, "/upload?mode=partial", format!("{HEADER}{}", row("p-9", "x", "Shop"))).await;
    let r = fleet.wait_for_status(none, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!(r.status, FileStatus::ValidationFailed);
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}
