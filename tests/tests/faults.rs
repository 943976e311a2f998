//! Delivery under faults: poison messages, replays from the DLQ, retries of failed files.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use txpipe_common::messages::{FileEvent, FileId, Stage};
use txpipe_common::status::{FileStatus, StatusRecord};
use txpipe_common::worker::{Handler, Incoming, Outcome};
use txpipe_common::Deps;
use txpipe_tests::{valid_csv, TestFleet};

/// The real validator, except that handling crashes: a poison message for it.
struct Crashing(txpipe_validator::Validator);

#[async_trait]
impl Handler for Crashing {
    fn stage(&self) -> Stage {
        Stage::Validator
    }
    async fn handle(&self, _msg: &Incoming) -> Outcome {
        panic!("simulated crash while handling");
    }
    async fn on_final_delivery(&self, msg: &Incoming, reason: &str) {
        self.0.on_final_delivery(msg, reason).await
    }
}

#[tokio::test]
async fn a_message_that_crashes_its_worker_ends_in_the_dlq_at_the_delivery_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.delivery_limit = 2;
    let deps = Deps::connect(settings.clone()).await.unwrap();
    deps.broker.declare_all().await.unwrap();
    let names = settings.names();
    let stop = tokio_util::sync::CancellationToken::new();
    let crashing = Arc::new(Crashing(txpipe_validator::Validator::new(deps.clone())));
    let worker = tokio::spawn({
        let (deps, stop) = (deps.clone(), stop.clone());
        async move {
            txpipe_common::worker::run(&deps.broker, crashing, deps.settings.clone(), stop.cancelled_owned()).await
        }
    });

    let id = FileId::new();
    let key = names.object_key(&id);
    deps.storage.statuses.create(&StatusRecord::uploaded(id, key.clone(), 1, chrono::Utc::now())).await.unwrap();
    let event = FileEvent::new(id, key);
    deps.publisher.publish(&deps.stage_message("file.uploaded", &event)).await.unwrap();

    // the broker gives up after the limit and dead-letters it, saying why
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
    let reason = match headers.inner().get("x-first-death-reason") {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("no x-first-death-reason: {other:?}"),
    };
    assert!(reason.contains("delivery_limit"), "{reason}");
    assert_eq!(FileEvent::from_body(&dead.delivery.data).unwrap().file_id, id);

    let record = deps.storage.statuses.get(id).await.unwrap().unwrap();
    assert_eq!(record.status, FileStatus::ValidationFailed);
    assert!(record.reason.unwrap().contains("delivery_limit"));

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
    fleet.publish_raw("file.uploaded", &FileEvent::new(id, key.clone()).to_body()).await;
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
