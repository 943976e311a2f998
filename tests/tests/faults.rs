//! Delivery under faults: poison messages, replays from the DLQ, retries of failed files.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use txpipe_common::messages::StageMessage;
use txpipe_common::stage::Stage;
use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate};
use txpipe_common::worker::{Failure, Handler, Passed, Step};
use txpipe_common::Deps;
use txpipe_common::FileId;
use txpipe_tests::{valid_csv, TestFleet};

/// A validator whose handling crashes on one file (a poison message for it) and validates the others.
struct Crashing {
    poison: FileId,
    crashes: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Handler for Crashing {
    fn stage(&self) -> Stage {
        Stage::Validator
    }
    async fn work(&self, msg: &StageMessage, _record: &StatusRecord, _passed: Passed) -> Result<Step, Failure> {
        if msg.file_id() == self.poison {
            self.crashes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            panic!("simulated crash while handling");
        }
        Ok(Step::Advance(FileStatus::Validated, StatusUpdate { row_count: Some(1), ..Default::default() }))
    }
}

/// Counted by txpipe in the file's record, not by the broker: RabbitMQ's own limit on the queue
/// is far above (so nothing here relies on it counting requeueing nacks, which from 4.3 it does
/// not), and a file handled next to the poison one is not pushed towards its limit.
#[tokio::test]
async fn a_message_that_crashes_its_worker_ends_in_the_dlq_at_the_delivery_limit() {
    poison_at_the_delivery_limit(false).await;
}

/// The same for a small file, which travels in its message and is not claimed: counted in the
/// message's header instead of the record, and the file failed all the same.
#[tokio::test]
async fn a_small_file_that_crashes_its_worker_is_failed_at_the_delivery_limit() {
    poison_at_the_delivery_limit(true).await;
}

async fn poison_at_the_delivery_limit(carried: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.delivery_limit = 2;
    assert!(txpipe_common::amqp::broker_delivery_limit(2) >= 20, "the broker's limit is only a safety net");
    let deps = Deps::connect(settings.clone()).await.unwrap();
    deps.broker.declare_all().await.unwrap();
    let names = settings.names();
    let stop = tokio_util::sync::CancellationToken::new();
    let (id, innocent) = (FileId::new(), FileId::new());
    let crashing = Arc::new(Crashing { poison: id, crashes: Default::default() });
    let worker = tokio::spawn({
        let (deps, stop, handler) = (deps.clone(), stop.clone(), crashing.clone());
        async move { txpipe_common::worker::run(&deps, handler, stop.cancelled_owned()).await }
    });

    for f in [id, innocent] {
        let key = names.object_key(&f);
        let body = txpipe_tests::valid_csv(&f.to_string()[..8], 2);
        let mut record = StatusRecord::uploaded(f, key.clone(), body.len() as u64, chrono::Utc::now());
        record.sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes())));
        deps.storage.statuses.create(&record).await.unwrap();
        let content = carried.then_some(txpipe_common::messages::Content(body));
        deps.publisher.publish(&StageMessage::uploaded(f, key).with_content(content).outgoing(&names)).await.unwrap();
    }

    // txpipe gives up after the limit and dead-letters it itself, saying why
    let ch = deps.broker.channel().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        if let Some(m) = ch.basic_get(names.dead_letter_queue().as_str().into(), Default::default()).await.unwrap() {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "the poison message never reached the DLQ");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let text = |name: &str| match headers.inner().get(name) {
        Some(lapin::types::AMQPValue::LongString(s)) => Some(s.to_string()),
        _ => None,
    };
    assert_eq!(text("x-txpipe-error-class").as_deref(), Some("delivery_limit"), "{headers:?}");
    assert!(text("x-txpipe-reason").unwrap().contains("crashed 2 time(s)"), "{headers:?}");
    assert!(headers.inner().get("x-death").is_none(), "not dead-lettered by the broker's count");
    assert_eq!(StageMessage::parse("file.uploaded", &dead.delivery.data).unwrap().file_id(), id);
    assert_eq!(dead.message_count, 0, "the DLQ holds exactly the poison message");
    assert_eq!(crashing.crashes.load(std::sync::atomic::Ordering::SeqCst), 2, "worked on exactly the limit's times");
    eprintln!(
        "chaos d (poison message, delivery limit 2): messages 1, dead-lettered 1 (delivery_limit, by txpipe's count), lost 0, DLQ 1"
    );

    let record = deps.storage.statuses.get(id).await.unwrap().unwrap();
    assert_eq!(record.status, FileStatus::ValidationFailed);
    assert!(record.reason.unwrap().contains("delivery_limit"));
    let other = deps.storage.statuses.get(innocent).await.unwrap().unwrap();
    assert_eq!(other.status, FileStatus::Validated, "the file next to it goes on: {other:#?}");

    stop.cancel();
    worker.await.unwrap().unwrap();
    deps.broker.teardown().await.unwrap();
}

#[tokio::test]
async fn a_file_that_failed_for_a_fault_is_processed_when_its_message_is_replayed() {
    let fleet = TestFleet::spawn_local().await;
    // a fault: the object is missing when the validator looks
    let id = FileId::new();
    let key = fleet.names.object_key(&id);
    let body = valid_csv("late", 3);
    let rec = StatusRecord::uploaded(id, key.clone(), body.len() as u64, chrono::Utc::now());
    fleet.deps.storage.statuses.create(&rec).await.unwrap();
    fleet.publish_raw("file.uploaded", &StageMessage::uploaded(id, key.clone()).to_body()).await;
    let failed = fleet.wait_for_status(id, &[FileStatus::ValidationFailed]).await;
    assert!(failed.errors.is_empty(), "a fault, not bad contents");
    let dead = fleet.dlq_take().await.unwrap();

    // the fault is fixed, and the dead letter goes back where it came from
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body))]);
    fleet.deps.storage.objects.put(&key, Box::pin(stream)).await.unwrap();
    fleet.publish_raw(&dead.routing_key, &dead.body).await;
    let done = fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    assert_eq!(done.records_processed, Some(3));
    let path: Vec<_> = done.history.iter().map(|h| h.status).collect();
    assert_eq!(
        &path[..4],
        [FileStatus::Uploaded, FileStatus::Validating, FileStatus::ValidationFailed, FileStatus::Validating]
    );
    fleet.shutdown().await;
}

/// Uploads, retrying while the gateway answers 503 (as a client should), up to a bound.
async fn upload_retrying(fleet: &TestFleet, body: String) -> (FileId, u32) {
    for refused in 0..200 {
        let r = fleet.post_upload(body.clone(), "text/csv").await;
        if r.status() == 202 {
            let v: serde_json::Value = r.json().await.unwrap();
            return (v["file_id"].as_str().unwrap().parse().unwrap(), refused);
        }
        let status = r.status();
        assert_eq!(status, 503, "only 503 while the broker is away: {}", r.text().await.unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway never took the upload");
}

#[tokio::test]
async fn cutting_the_broker_connection_during_a_batch_loses_nothing() {
    let proxy = txpipe_tests::proxy::Proxy::start(txpipe_tests::proxy::broker_addr()).await;
    let fleet = TestFleet::spawn_with(|s| s.amqp_url = proxy.amqp_url()).await;
    let mut tap = fleet.tap_notifications().await; // a direct connection: sees every notice
    const FILES: usize = 12;
    const ROWS: usize = 400;
    let cutter = {
        let proxy_cut = Arc::new(proxy);
        let p = proxy_cut.clone();
        (
            tokio::spawn(async move {
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    p.cut();
                }
            }),
            proxy_cut,
        )
    };
    let mut ids = Vec::new();
    let mut refused = 0;
    for i in 0..FILES {
        let (id, r) = upload_retrying(&fleet, valid_csv(&format!("cut{i}"), ROWS)).await;
        ids.push(id);
        refused += r;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    cutter.0.await.unwrap();
    let mut completed = 0;
    let mut rows = 0;
    for id in &ids {
        let r = fleet.wait_for_status(*id, &[FileStatus::Completed]).await;
        completed += 1;
        let stored = fleet.transactions(*id, 1000).await;
        let distinct: std::collections::HashSet<_> = stored.iter().map(|t| &t.transaction_id).collect();
        assert_eq!((stored.len(), distinct.len()), (ROWS, ROWS), "every row once");
        assert_eq!(r.records_processed, Some(ROWS as u64));
        rows += stored.len();
    }
    let notices = tap.drain(Duration::from_secs(2)).await;
    let ids_notified: std::collections::HashSet<_> = notices.iter().map(|n| n.message_id.clone()).collect();
    if ids_notified.len() != FILES {
        let seen: Vec<_> =
            notices.iter().map(|n| (n.routing_key.clone(), n.message_id.clone(), n.body.status)).collect();
        let mut statuses = Vec::new();
        for n in &notices {
            if !ids.contains(&n.body.file_id) {
                statuses.push(fleet.get_json(&format!("/files/{}", n.body.file_id)).await);
            }
        }
        let dead = txpipe_cli::dlq::list(&fleet.admin, &Default::default()).await.unwrap();
        panic!("one notification id per file expected; ids {ids:?}\nnotices {seen:#?}\nunknown files {statuses:#?}\nDLQ {dead:#?}");
    }
    let dlq = fleet.dlq_count().await;
    if dlq != 0 {
        let letters = txpipe_cli::dlq::list(&fleet.admin, &Default::default()).await.unwrap();
        panic!("the DLQ should be empty: {letters:#?}");
    }
    eprintln!(
        "chaos b (connection cut x4): files pushed {FILES}, completed {completed}, lost {}, rows {rows} (duplicates 0), \
         notices {} for {} ids, uploads refused with 503 {refused}, DLQ {dlq}",
        FILES - completed,
        notices.len(),
        ids_notified.len()
    );
    fleet.shutdown().await;
    drop(cutter.1);
}

#[tokio::test]
async fn while_the_broker_is_unreachable_readyz_fails_and_uploads_get_503() {
    let proxy = txpipe_tests::proxy::Proxy::start(txpipe_tests::proxy::broker_addr()).await;
    let fleet = TestFleet::spawn_with(|s| s.amqp_url = proxy.amqp_url()).await;
    proxy.refuse(true);
    proxy.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = fleet.get_json("/readyz").await;
        if code == 503 {
            assert!(body["reason"].as_str().unwrap().contains("RabbitMQ"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz never said not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = fleet.post_upload(valid_csv("away", 2), "text/csv").await;
    assert_eq!(r.status(), 503);
    assert_eq!(fleet.object_count().await, 0, "nothing kept for a refused upload");

    proxy.refuse(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fleet.get_json("/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (id, _) = upload_retrying(&fleet, valid_csv("back", 2)).await;
    fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_broker_gone_for_longer_than_the_bound_stops_the_fleet_with_an_error() {
    let proxy = txpipe_tests::proxy::Proxy::start(txpipe_tests::proxy::broker_addr()).await;
    let fleet = TestFleet::spawn_with(|s| {
        s.amqp_url = proxy.amqp_url();
        s.reconnect_timeout_ms = 1500;
    })
    .await;
    proxy.refuse(true);
    proxy.cut();
    let stopped = fleet.stopped_on_its_own(Duration::from_secs(20)).await.expect("the fleet stops by itself");
    let err = stopped.expect_err("it stops with an error").to_string();
    assert!(err.contains("reconnect") || err.contains("RabbitMQ"), "{err}");
}

#[tokio::test]
async fn storage_failing_for_a_while_then_recovering_loses_nothing() {
    let moto: std::net::SocketAddr = txpipe_tests::aws::endpoint().trim_start_matches("http://").parse().unwrap();
    let proxy = txpipe_tests::proxy::Proxy::start(moto).await;
    let fleet = TestFleet::spawn_aws_at(&format!("http://{}", proxy.addr), |s| {
        // retries long enough to outlast the outage: 100 ms, 200 ms, ... about 12 s in all
        s.retry_attempts = 8;
        s.retry_initial_delay_ms = 100;
        // short enough that calls during the outage fail fast, long enough for a busy moto
        s.aws_operation_timeout_ms = 5000;
    })
    .await;
    let mut tap = fleet.tap_notifications().await;
    const FILES: usize = 8;
    const ROWS: usize = 300;
    let mut ids = Vec::new();
    let mut refused = 0;
    for i in 0..FILES {
        if i == 3 {
            // S3 and DynamoDB go away for 2.5 s while files are in flight
            proxy.refuse(true);
            proxy.cut();
            let p = &proxy;
            let outage = async {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                p.refuse(false);
            };
            let uploads = async {
                let mut got = Vec::new();
                for j in 0..2 {
                    got.push(upload_retrying(&fleet, valid_csv(&format!("out{j}"), ROWS)).await);
                }
                got
            };
            let (_, got) = tokio::join!(outage, uploads);
            for (id, r) in got {
                ids.push(id);
                refused += r;
            }
            continue;
        }
        let (id, r) = upload_retrying(&fleet, valid_csv(&format!("st{i}"), ROWS)).await;
        ids.push(id);
        refused += r;
    }
    let mut completed = 0;
    let mut rows = 0;
    for id in &ids {
        let r = fleet
            .wait_for_status(*id, &[FileStatus::Completed, FileStatus::ValidationFailed, FileStatus::ProcessingFailed])
            .await;
        assert_eq!(r.status, FileStatus::Completed, "{r:#?}");
        completed += 1;
        let stored = fleet.transactions(*id, 1000).await;
        assert_eq!(stored.len(), ROWS, "{r:#?}");
        rows += stored.len();
    }
    let notices = tap.drain(Duration::from_secs(2)).await;
    let distinct: std::collections::HashSet<_> = notices.iter().map(|n| n.message_id.clone()).collect();
    assert_eq!(distinct.len(), ids.len());
    let dlq = fleet.dlq_count().await;
    assert_eq!(dlq, 0);
    eprintln!(
        "chaos c (S3+DynamoDB unreachable 2.5 s): files pushed {}, completed {completed}, lost {}, rows {rows} (duplicates 0), \
         uploads refused with 503 {refused}, DLQ {dlq}",
        ids.len(),
        ids.len() - completed
    );
    fleet.shutdown().await;
}

/// Records an upload as the gateway leaves it when the confirm of its `file.uploaded` is lost:
/// the object stored, the record not announced.
async fn unconfirmed_upload(fleet: &TestFleet, tag: &str) -> (FileId, String) {
    let id = FileId::new();
    let key = fleet.names.object_key(&id);
    let body = valid_csv(tag, 2);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body.clone()))]);
    fleet.deps.storage.objects.put(&key, Box::pin(stream)).await.unwrap();
    let mut rec = StatusRecord::uploaded(id, key.clone(), body.len() as u64, chrono::Utc::now());
    rec.announced = false;
    fleet.deps.storage.statuses.create(&rec).await.unwrap();
    (id, key)
}

#[tokio::test]
async fn an_upload_the_gateway_withdrew_is_dropped_even_if_its_message_got_through() {
    let fleet = TestFleet::spawn().await;
    let (id, key) = unconfirmed_upload(&fleet, "w").await;
    // the gateway gives up and undoes, record first; the message got through meanwhile and
    // arrives while the object is still there (the withdrawal half done: the validator tries
    // again, within its retries, until the object is gone too)
    assert!(fleet.deps.storage.statuses.withdraw(id).await.unwrap(), "an unannounced upload can be withdrawn");
    fleet.publish_raw("file.uploaded", &StageMessage::uploaded(id, key.clone()).to_body()).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    fleet.deps.storage.objects.delete(&key).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fleet.get_json(&format!("/files/{id}")).await.0, 404);
    assert_eq!(fleet.dlq_count().await, 0, "a withdrawn upload is not an error");
    // and an announced one goes through as usual
    let ok = fleet.upload(valid_csv("ok", 2)).await.file_id;
    fleet.wait_for_status(ok, &[FileStatus::Completed]).await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_validator_that_claims_an_unconfirmed_upload_first_keeps_the_gateway_from_withdrawing_it() {
    let fleet = TestFleet::spawn().await;
    let (id, key) = unconfirmed_upload(&fleet, "c").await;
    // the message got through before the gateway's mark: the validator does not wait for it
    fleet.publish_raw("file.uploaded", &StageMessage::uploaded(id, key).to_body()).await;
    let done = fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    assert!(done.announced, "claiming the file marked it announced");
    // so a gateway whose confirm failed can no longer take it back (it answers 202 instead)
    assert!(!fleet.deps.storage.statuses.withdraw(id).await.unwrap());
    assert_eq!(fleet.transactions(id, 10).await.len(), 2);
    fleet.shutdown().await;
}
