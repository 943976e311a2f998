//! End-to-end: the fleet on port 0 with a fresh namespace against the real RabbitMQ; files go
//! in over HTTP and come out as statuses, stored rows, notifications and an empty DLQ.

use std::time::Duration;
use txpipe_common::messages::StageMessage;
use txpipe_common::stage::RoutingKey;
use txpipe_common::status::FileStatus;
use txpipe_common::storage::local::LocalLayout;
use txpipe_common::FileId;
use txpipe_tests::{ghost, valid_csv, TestFleet};

const HEADER: &str = "transaction_id,amount,currency,timestamp,merchant,status\n";
const QUIET: Duration = Duration::from_millis(500);

#[tokio::test]
async fn a_valid_file_goes_all_the_way_and_is_announced_once() {
    valid_file_goes_all_the_way(TestFleet::spawn().await).await;
}

async fn valid_file_goes_all_the_way(fleet: TestFleet) {
    let mut tap = fleet.tap_notifications().await;
    let body = format!(
        "{HEADER}t-1,0.10,USD,2024-01-15T10:30:00Z,Acme,completed\n\
         t-2,12345678901234567890.123456789,EUR,2024-01-15T10:30:00+02:00,\"Bob, Ltd\",pending\n\
         t-3,-5,JPY,2024-02-29T23:59:59.5Z,Café,failed\n"
    );
    let accepted = fleet.upload(body.clone()).await;
    assert_eq!(accepted.status, "uploaded");
    assert_eq!(accepted.status_url, format!("/files/{}", accepted.file_id));

    let record = fleet.wait_for_status(accepted.file_id, &[FileStatus::Completed]).await;
    assert_eq!(record.row_count, Some(3));
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
    assert_eq!(record.sha256.as_deref(), Some(sha256.as_str()), "the upload's SHA-256");
    assert_eq!(record.records_processed, Some(3));
    let path: Vec<_> = record.history.iter().map(|h| h.status).collect();
    use FileStatus::*;
    // the notifier moves a fresh file from processed to completed in one write
    assert_eq!(path, [Uploaded, Validating, Validated, Processing, Processed, Completed]);

    let rows = fleet.transactions(accepted.file_id, 2).await;
    let amounts: Vec<_> = rows.iter().map(|t| (t.transaction_id.as_str(), t.amount.to_string())).collect();
    assert_eq!(
        amounts,
        [("t-1", "0.10".into()), ("t-2", "12345678901234567890.123456789".into()), ("t-3", "-5".into())]
    );
    assert_eq!(rows[1].merchant, "Bob, Ltd");
    assert_eq!(rows[1].timestamp_epoch, 1705307400);
    assert!(rows.iter().all(|t| t.file_id == accepted.file_id));
    // amounts travel as strings in the JSON, never as floats
    let (_, raw) = fleet.get_json(&format!("/files/{}/transactions", accepted.file_id)).await;
    assert_eq!(raw["items"][1]["amount"], "12345678901234567890.123456789");

    let n = tap.next(Duration::from_secs(10)).await.expect("a notification");
    assert_eq!(n.routing_key, "file.completed");
    assert_eq!(n.message_id, format!("{}:file.completed", accepted.file_id));
    assert_eq!(n.body.file_id, accepted.file_id);
    assert_eq!(n.body.status, Completed);
    assert_eq!((n.body.records_processed, n.body.error_count), (3, 0));
    assert!(tap.drain(QUIET).await.is_empty(), "exactly one notification");
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn an_invalid_file_is_rejected_with_its_row_errors() {
    invalid_file_is_rejected(TestFleet::spawn().await).await;
}

async fn invalid_file_is_rejected(fleet: TestFleet) {
    let mut tap = fleet.tap_notifications().await;
    let body = format!(
        "{HEADER}t-1,abc,USD,2024-01-15T10:30:00Z,Acme,completed\nt-2,1,usd,yesterday,,done\nt-1,2,EUR,2024-01-15T10:30:00Z,X,pending\n"
    );
    let id = fleet.upload(body).await.file_id;
    let record = fleet.wait_for_status(id, &[FileStatus::ValidationFailed]).await;
    assert_eq!(record.row_count, Some(3));
    assert_eq!(record.error_count, Some(6));
    let cells: Vec<_> = record.errors.iter().map(|e| (e.row, e.column.clone().unwrap_or_default())).collect();
    let expected: Vec<(u64, String)> =
        [(1, "amount"), (2, "currency"), (2, "timestamp"), (2, "merchant"), (2, "status"), (3, "transaction_id")]
            .into_iter()
            .map(|(r, c)| (r, c.to_string()))
            .collect();
    assert_eq!(cells, expected, "errors in row order, then column order");
    assert!(record.reason.unwrap().contains("6 problem(s)"));
    let n = tap.next(Duration::from_secs(10)).await.expect("a notification");
    assert_eq!(n.routing_key, "file.rejected");
    assert_eq!(n.message_id, format!("{id}:file.rejected"));
    assert_eq!(n.body.status, FileStatus::ValidationFailed);
    assert_eq!(n.body.error_count, 6);
    assert!(fleet.transactions(id, 100).await.is_empty(), "nothing from a rejected file is stored");
    // the status stays validation_failed: a rejection is final
    tokio::time::sleep(QUIET).await;
    assert_eq!(fleet.status(id).await.status, FileStatus::ValidationFailed);
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}

/// Every bad input of the contract ends as validation_failed with a reason a person can read;
/// none crashes a worker or reaches the DLQ. Good-but-unusual files complete.
#[tokio::test]
async fn unusual_and_bad_files_end_where_they_should() {
    let fleet = TestFleet::spawn().await;
    let row = "t1,1.00,USD,2024-01-15T10:30:00Z,Acme,completed\n";
    let mut thousands = String::from(HEADER);
    for i in 0..3000 {
        thousands.push_str(&format!("t{i},not-money,USD,2024-01-15T10:30:00Z,m,completed\n"));
    }
    let mut unclosed = format!("{HEADER}t0,1,USD,2024-01-15T10:30:00Z,\"open,completed\n");
    for i in 0..60_000 {
        unclosed.push_str(&format!("t{i},1,USD,2024-01-15T10:30:00Z,m,completed\n"));
    }
    let garbage: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let mut bad_utf8 = HEADER.as_bytes().to_vec();
    bad_utf8.extend_from_slice(b"t1,1,USD,2024-01-15T10:30:00Z,caf\xe9\xff,completed\n");
    let cases: Vec<(&str, Vec<u8>, FileStatus, &str)> = vec![
        ("bom and crlf", format!("\u{FEFF}{}", format!("{HEADER}{row}").replace('\n', "\r\n")).into_bytes(), FileStatus::Completed, ""),
        (
            "quoted commas, quotes and newlines",
            // each completing case carries its own transaction id: one id is one transaction
            format!("{HEADER}t2,1,USD,2024-01-15T10:30:00Z,\"A, \"\"B\"\"\nC\",completed\n").into_bytes(),
            FileStatus::Completed,
            "",
        ),
        (
            "extra and reordered columns",
            "note,status,merchant,timestamp,currency,amount,transaction_id,more\nx,pending,M,2024-01-15T10:30:00Z,GBP,2.5,t3,y\n".into(),
            FileStatus::Completed,
            "",
        ),
        ("invalid utf-8", bad_utf8, FileStatus::ValidationFailed, "UTF-8"),
        ("ragged row", format!("{HEADER}t1,1,USD\n").into_bytes(), FileStatus::ValidationFailed, "fields but the header has 6"),
        ("header only", HEADER.into(), FileStatus::ValidationFailed, "no data rows"),
        ("binary garbage", garbage, FileStatus::ValidationFailed, "lacks required column"),
        ("nan amount", format!("{HEADER}t1,NaN,USD,2024-01-15T10:30:00Z,m,completed\n").into_bytes(), FileStatus::ValidationFailed, "not a decimal"),
        ("thousands of bad rows", thousands.into_bytes(), FileStatus::ValidationFailed, "3000 problem(s)"),
        ("an unclosed quote in a large file", unclosed.into_bytes(), FileStatus::ValidationFailed, "quote left open"),
    ];
    let mut uploaded = Vec::new();
    for (name, body, want, reason) in cases {
        uploaded.push((name, fleet.upload(body).await.file_id, want, reason));
    }
    for (name, id, want, reason) in uploaded {
        let r = fleet.wait_for_status(id, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
        assert_eq!(r.status, want, "{name}: {r:#?}");
        if want == FileStatus::ValidationFailed {
            let why = r.reason.clone().unwrap_or_default();
            assert!(why.contains(reason), "{name}: reason {why:?} lacks {reason:?}");
            assert!(!r.errors.is_empty(), "{name}");
            assert!(r.errors.len() <= 100, "{name}: the error list is capped");
        }
        if name == "thousands of bad rows" {
            assert_eq!((r.row_count, r.error_count, r.errors.len()), (Some(3000), Some(3000), 100));
        }
    }
    assert_eq!(fleet.dlq_count().await, 0, "bad files are rejected, never dead-lettered");
    fleet.shutdown().await;
}

#[tokio::test]
async fn the_gateway_refuses_bad_requests_clearly() {
    let fleet = TestFleet::spawn_with(|s| s.max_upload_bytes = 1024).await;
    let r = fleet.post_upload(valid_csv("a", 1), "application/json").await;
    assert_eq!(r.status(), 415);
    assert!(r.text().await.unwrap().contains("text/csv"));
    let r = fleet.post_upload("", "text/csv").await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("empty"));
    let r = fleet.post_upload(valid_csv("a", 100), "text/csv").await;
    assert_eq!(r.status(), 413);
    // a streamed body without Content-Length is cut off at the limit too
    let chunks: Vec<Result<String, std::io::Error>> = (0..50).map(|i| Ok(valid_csv(&format!("s{i}"), 1))).collect();
    let r = fleet.post_upload(reqwest::Body::wrap_stream(futures::stream::iter(chunks)), "text/csv").await;
    assert_eq!(r.status(), 413);
    assert_eq!(fleet.object_count().await, 0, "refused uploads leave no object behind");
    let r = fleet.post_upload(valid_csv("ok", 2), "text/csv; charset=utf-8").await;
    assert_eq!(r.status(), 202);

    let (code, body) = fleet.get_json(&format!("/files/{}", FileId::new())).await;
    assert_eq!((code, body["error"].as_str()), (404, Some("not_found")));
    let (code, _) = fleet.get_json("/files/not-an-id").await;
    assert_eq!(code, 404);
    let id = FileId::new();
    let (code, _) = fleet.get_json(&format!("/files/{id}/transactions")).await;
    assert_eq!(code, 404);
    let (code, _) = fleet.get_json("/healthz").await;
    assert_eq!(code, 200);
    fleet.shutdown().await;
}

#[tokio::test]
async fn bad_paging_parameters_are_400() {
    let fleet = TestFleet::spawn().await;
    let id = fleet.upload(valid_csv("p", 3)).await.file_id;
    fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    for q in ["limit=0", "limit=abc", "limit=100000", "cursor=zz"] {
        let (code, body) = fleet.get_json(&format!("/files/{id}/transactions?{q}")).await;
        assert_eq!(code, 400, "{q}: {body}");
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn when_the_broker_cannot_take_an_upload_the_client_gets_503_and_nothing_is_kept() {
    // a gateway alone, whose upload queue is then deleted: file.uploaded cannot be routed,
    // so the broker refuses the publish
    let dir = tempfile::tempdir().unwrap();
    let settings = txpipe_tests::test_settings(dir.path());
    let names = settings.names();
    let deps = txpipe_common::Deps::connect(settings).await.unwrap();
    deps.broker.declare_for(txpipe_common::stage::Service::Gateway).await.unwrap();
    let ch = deps.broker.channel().await.unwrap();
    ch.queue_delete(names.queue(txpipe_common::stage::Stage::Validator).as_str().into(), Default::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upload", listener.local_addr().unwrap());
    let app = txpipe_ingest_gateway::router(deps.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let key = txpipe_tests::new_key(&deps, "gateway-alone", false, txpipe_tests::UNLIMITED).await;
    let r = txpipe_tests::client_with_key(&key)
        .post(&url)
        .header("content-type", "text/csv")
        .body(valid_csv("x", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let layout = LocalLayout::new(dir.path(), &names);
    assert_eq!(txpipe_tests::local_object_count(&layout).await, 0, "no object claims to be accepted");
    server.abort();
    deps.broker.teardown().await.unwrap();
}

#[tokio::test]
async fn when_the_store_cannot_take_an_upload_the_client_gets_503() {
    // a directory that cannot be written and a table that is gone: local storage only
    let fleet = TestFleet::spawn_local().await;
    let layout = LocalLayout::of(&fleet.settings);
    // a large file (over 64 KiB: a file of its own) where the directory should be a file
    let uploads = layout.objects_dir().join("uploads");
    let _ = std::fs::remove_dir_all(&uploads);
    std::fs::write(&uploads, b"a file where the directory should be").unwrap();
    let large = valid_csv("large", 1000);
    assert!(large.len() > txpipe_common::storage::local::IN_DATABASE_MAX);
    let r = fleet.post_upload(large.clone(), "text/csv").await;
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(text.contains("storing the upload"), "{text}");
    std::fs::remove_file(&uploads).unwrap();

    // a small file (a row of the database's objects table) while that table is gone
    let table = format!("\"{}\"", fleet.names.bucket());
    let sql = rusqlite::Connection::open(layout.database()).unwrap();
    sql.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    sql.execute_batch(&format!("DROP TABLE {table}")).unwrap();
    let r = fleet.post_upload(valid_csv("x", 2), "text/csv").await;
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(text.contains("storing the upload"), "{text}");
    sql.execute_batch(&format!("CREATE TABLE {table} (key TEXT PRIMARY KEY, body BLOB NOT NULL)")).unwrap();

    assert_eq!(txpipe_tests::local_object_count(&layout).await, 0, "nothing stored for either");
    for csv in [valid_csv("y", 2), large] {
        let ok = fleet.upload(csv).await.file_id;
        fleet.wait_for_status(ok, &[FileStatus::Completed]).await;
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_redelivered_message_never_moves_a_file_back() {
    redelivery_never_moves_back(TestFleet::spawn().await).await;
}

async fn redelivery_never_moves_back(fleet: TestFleet) {
    let mut tap = fleet.tap_notifications().await;
    let accepted = fleet.upload(valid_csv("r", 4)).await;
    let done = fleet.wait_for_status(accepted.file_id, &[FileStatus::Completed]).await;
    assert_eq!(tap.drain(QUIET).await.len(), 1);
    // every stage message for this file, again, as a broker redelivery would bring them
    for key in [RoutingKey::FileUploaded, RoutingKey::FileValidated, RoutingKey::FileProcessed] {
        fleet.publish_raw(key.as_str(), &StageMessage::from_record(key, &done).to_body()).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = fleet.status(accepted.file_id).await;
    assert_eq!(after.status, FileStatus::Completed);
    assert_eq!(after.history, done.history, "no status change at all");
    assert_eq!(fleet.transactions(accepted.file_id, 100).await.len(), 4);
    assert!(tap.drain(QUIET).await.is_empty(), "no second completion notice");
    assert_eq!(fleet.dlq_count().await, 0);
    eprintln!(
        "chaos e (every stage message delivered twice): files 1, completed 1, status changes 0, rows 4 (duplicates 0), \
         notices 1, DLQ 0"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_repeated_rejection_notice_keeps_its_message_id() {
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    let id = fleet.upload(format!("{HEADER}t1,x,USD,2024-01-15T10:30:00Z,m,completed\n")).await.file_id;
    let rec = fleet.wait_for_status(id, &[FileStatus::ValidationFailed]).await;
    let first = tap.next(Duration::from_secs(10)).await.unwrap();
    let event = StageMessage::from_record(RoutingKey::FileRejected, &rec);
    fleet.publish_raw("file.rejected", &event.to_body()).await;
    let second = tap.next(Duration::from_secs(10)).await.expect("the duplicate is delivered");
    assert_eq!(first.message_id, second.message_id, "a subscriber can drop the copy by its id");
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_broken_message_goes_to_the_dlq_at_once_and_the_worker_carries_on() {
    let fleet = TestFleet::spawn().await;
    fleet.publish_raw("file.uploaded", b"{this is not json").await;
    let dead = fleet.dlq_take().await.expect("the broken message is dead-lettered");
    assert_eq!(dead.routing_key, "file.uploaded");
    assert_eq!(dead.body, b"{this is not json");
    assert_eq!(dead.headers["x-txpipe-stage"], "validator");
    assert_eq!(dead.headers["x-txpipe-error-class"], "malformed");
    assert!(dead.headers["x-txpipe-reason"].contains("malformed file event"));
    assert_eq!(dead.headers["x-txpipe-original-exchange"], fleet.names.pipeline_exchange());

    // a message for a file nobody uploaded can never succeed either
    let ghost = ghost(RoutingKey::FileValidated);
    fleet.publish_raw("file.validated", &ghost.to_body()).await;
    let dead = fleet.dlq_take().await.expect("the ghost is dead-lettered");
    assert_eq!(dead.headers["x-txpipe-stage"], "transformer");
    assert_eq!(dead.headers["x-txpipe-error-class"], "permanent");

    let id = fleet.upload(valid_csv("after", 2)).await.file_id;
    fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_file_whose_object_vanished_fails_its_stage_and_is_announced() {
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    // record an upload by hand whose object is missing, then announce it
    let id = FileId::new();
    let key = fleet.names.object_key(&id);
    let rec = txpipe_common::status::StatusRecord::uploaded(id, key.clone(), 10, chrono::Utc::now());
    fleet.deps.storage.statuses.create(&rec).await.unwrap();
    fleet.publish_raw("file.uploaded", &StageMessage::uploaded(id, key).to_body()).await;
    let r = fleet.wait_for_status(id, &[FileStatus::ValidationFailed]).await;
    assert!(r.reason.unwrap().contains("not found"));
    let n = tap.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(n.routing_key, "file.failed");
    let dead = fleet.dlq_take().await.unwrap();
    assert_eq!(dead.headers["x-txpipe-error-class"], "permanent");
    fleet.shutdown().await;
}

#[tokio::test]
async fn metrics_count_uploads_messages_and_rows() {
    let fleet = TestFleet::spawn().await;
    let ok = fleet.upload(valid_csv("m", 7)).await.file_id;
    let bad = fleet.upload(format!("{HEADER}t1,x,USD,2024-01-15T10:30:00Z,m,completed\n")).await.file_id;
    fleet.wait_for_status(ok, &[FileStatus::Completed]).await;
    fleet.wait_for_status(bad, &[FileStatus::ValidationFailed]).await;
    let _ = fleet.post_upload("", "text/csv").await;
    let text = fleet.http.get(format!("{}/metrics", fleet.base_url)).send().await.unwrap().text().await.unwrap();
    // one registry per test process: other tests add to the same counters, so look for at least;
    // a series' labels may come in any order (the encoder sorts them by name)
    let series = |s: &str| -> (String, Vec<String>) {
        let (name, labels) = s.split_once('{').unwrap_or((s, ""));
        let mut labels: Vec<String> = labels.trim_end_matches('}').split(',').map(String::from).collect();
        labels.sort();
        (name.to_string(), labels)
    };
    let value = |needle: &str| -> f64 {
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(s, _)| series(s) == series(needle))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("{needle} missing from /metrics:\n{text}"))
    };
    assert!(value("txpipe_uploads_total{result=\"accepted\"}") >= 2.0);
    assert!(value("txpipe_uploads_total{result=\"empty_body\"}") >= 1.0);
    assert!(value("txpipe_messages_total{stage=\"validator\",outcome=\"done\"}") >= 2.0);
    assert!(value("txpipe_messages_total{stage=\"notifier\",outcome=\"done\"}") >= 2.0);
    assert!(value("txpipe_rows_stored_total") >= 7.0);
    assert!(value("txpipe_files_rejected_total") >= 1.0);
    assert!(value("txpipe_broker_connected") >= 1.0);
    assert!(text.contains("txpipe_message_seconds_bucket{stage=\"transformer\""));
    assert!(value("txpipe_files_finished_total{status=\"completed\"}") >= 1.0);
    assert!(value("txpipe_files_finished_total{status=\"validation_failed\"}") >= 1.0);
    assert_eq!(value("txpipe_dlq_messages"), 0.0, "the DLQ's depth, read at the scrape");
    if fleet.settings.storage == txpipe_common::config::StorageKind::Aws {
        // every request to S3 and DynamoDB, by operation
        assert!(value("txpipe_storage_calls_total{service=\"s3\",operation=\"PutObject\"}") >= 2.0);
        assert!(value("txpipe_storage_calls_total{service=\"dynamodb\",operation=\"TransactWriteItems\"}") >= 1.0);
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn the_clients_trace_follows_the_file_to_its_notification() {
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = fleet
        .http
        .post(format!("{}/upload", fleet.base_url))
        .header("content-type", "text/csv")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(valid_csv("tr", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert!(resp.headers()["traceparent"].to_str().unwrap().contains(trace));
    let id: FileId = resp.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().parse().unwrap();
    fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    let n = tap.next(Duration::from_secs(10)).await.unwrap();
    let carried = n.traceparent.expect("the notification carries the trace");
    assert!(carried.starts_with(&format!("00-{trace}-")), "{carried}");
    assert!(!carried.contains("00f067aa0ba902b7"), "with a span of its own");

    // without a trace from the client, the gateway starts one
    let untraced = fleet.post_upload(valid_csv("nt", 1), "text/csv").await;
    assert!(untraced.headers()["traceparent"].to_str().unwrap().starts_with("00-"));
    fleet.shutdown().await;
}

/// The next copy on `key` from a tap on the pipeline exchange (copies on other keys are skipped).
async fn next_stage_message(tap: &mut lapin::Consumer, key: RoutingKey) -> StageMessage {
    use futures::StreamExt;
    loop {
        let next = tokio::time::timeout(txpipe_tests::WAIT, tap.next()).await;
        let d = next.unwrap_or_else(|_| panic!("no {key} message")).expect("the tap is open").unwrap();
        if d.routing_key.as_str() == key.as_str() {
            return StageMessage::parse(key.as_str(), &d.data).unwrap();
        }
    }
}

#[tokio::test]
async fn a_small_file_travels_in_its_messages_and_a_large_one_does_not() {
    let fleet = TestFleet::spawn_with(|s| s.inline_max_bytes = 4096).await;
    let (_ch, mut tap) = fleet.tap(&fleet.names.pipeline_exchange(), "file.*").await;
    let small = valid_csv("inl", 5);
    let id = fleet.upload(small.clone()).await.file_id;
    for key in [RoutingKey::FileUploaded, RoutingKey::FileValidated] {
        let m = next_stage_message(&mut tap, key).await;
        assert_eq!(m.file_id(), id);
        assert_eq!(m.content().map(|c| c.0.as_str()), Some(small.as_str()), "{key} carries the file");
    }
    fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    let m = next_stage_message(&mut tap, RoutingKey::FileProcessed).await;
    assert!(m.content().is_none(), "file.processed does not carry it: nobody reads the file after the transformer");
    // over the limit: a claim check only, the object is read
    let large = valid_csv("big", 200);
    assert!(large.len() > 4096);
    let id = fleet.upload(large).await.file_id;
    let m = next_stage_message(&mut tap, RoutingKey::FileUploaded).await;
    assert_eq!(m.file_id(), id);
    assert!(m.content().is_none());
    let done = fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    assert_eq!(done.records_processed, Some(200));
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_carried_copy_that_is_not_the_stored_file_is_ignored() {
    let fleet = TestFleet::spawn().await;
    // a file recorded and stored as the gateway would, announced by a message whose carried
    // copy is other bytes: the stages read the stored file
    let stored = valid_csv("real", 3);
    let id = FileId::new();
    let key = fleet.names.object_key(&id);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(stored.clone()))]);
    fleet.deps.storage.objects.put(&key, Box::pin(stream)).await.unwrap();
    let mut rec = txpipe_common::status::StatusRecord::uploaded(id, key, stored.len() as u64, chrono::Utc::now());
    rec.sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(stored.as_bytes())));
    fleet.deps.storage.statuses.create(&rec).await.unwrap();
    let forged = valid_csv("fake", 3);
    assert_eq!(forged.len(), stored.len(), "same size: only the digest tells them apart");
    let msg = StageMessage::from_record(RoutingKey::FileUploaded, &rec)
        .with_content(txpipe_common::messages::Content::of(forged.into_bytes()));
    fleet.publish_raw("file.uploaded", &msg.to_body()).await;
    let done = fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    assert_eq!(done.records_processed, Some(3));
    let ids: Vec<String> = fleet.transactions(id, 10).await.into_iter().map(|t| t.transaction_id).collect();
    assert_eq!(ids, ["real-000000", "real-000001", "real-000002"]);
    fleet.shutdown().await;
}
