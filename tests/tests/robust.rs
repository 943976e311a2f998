//! No file stuck or lost, concurrent copies harmless (issue 9, items 4 and 5): two copies of one
//! stage message at once with one failing, a storage outage longer than every retry with the
//! default retry settings, and a file left in a working status with no message to move it.

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use txpipe_common::messages::{Notification, StageMessage};
use txpipe_common::stage::{RoutingKey, Stage};
use txpipe_common::status::{Attempt, FileStatus, StatusRecord, StatusUpdate};
use txpipe_common::worker::{Failure, Handler, Passed, Step};
use txpipe_common::{Deps, FileId, Settings};
use txpipe_tests::{valid_csv, TestFleet, WAIT};

/// The real transformer, with a gate on each file's first `work` and a failure of the file's
/// choosing: the second copy's (if it ever works while the first does), or the first's.
struct Gated {
    inner: Arc<dyn Handler>,
    /// The file whose first attempt fails (after its gate opens).
    first_fails: FileId,
    state: Mutex<HashMap<FileId, PerFile>>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct PerFile {
    works: usize,
    working: bool,
    open: bool,
}

impl Gated {
    fn with<T>(&self, id: FileId, f: impl FnOnce(&mut PerFile) -> T) -> T {
        let out = f(self.state.lock().unwrap().entry(id).or_default());
        self.changed.notify_waiters();
        out
    }

    async fn until(&self, id: FileId, cond: impl Fn(&PerFile) -> bool) {
        tokio::time::timeout(WAIT, async {
            loop {
                let notified = self.changed.notified();
                if cond(self.state.lock().unwrap().entry(id).or_default()) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("the condition never held");
    }
}

#[async_trait]
impl Handler for Gated {
    fn stage(&self) -> Stage {
        Stage::Transformer
    }

    async fn work(&self, msg: &StageMessage, record: &StatusRecord, passed: Passed) -> Result<Step, Failure> {
        let id = record.file_id;
        let concurrent = self.with(id, |s| {
            s.works += 1;
            std::mem::replace(&mut s.working, true)
        });
        if concurrent {
            return Err(Failure::DeadLetter("simulated: the second copy fails".into()));
        }
        self.until(id, |s| s.open).await;
        let result = if id == self.first_fails {
            Err(Failure::DeadLetter("simulated: the first copy fails".into()))
        } else {
            self.inner.work(msg, record, passed).await
        };
        self.with(id, |s| s.working = false);
        result
    }
}

/// A file as the validator leaves it: its object stored, its record `validated`.
async fn validated_file(deps: &Deps, rows: usize, at: chrono::DateTime<chrono::Utc>) -> StatusRecord {
    let id = FileId::new();
    let key = deps.names.object_key(&id);
    let body = valid_csv(&id.to_string()[..8], rows);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body.clone()))]);
    deps.storage.objects.put(&key, Box::pin(stream)).await.unwrap();
    let mut r = StatusRecord::uploaded(id, key, body.len() as u64, at);
    assert!(r.advance(FileStatus::Validating, StatusUpdate::default(), at));
    assert!(r.advance(FileStatus::Validated, StatusUpdate { row_count: Some(rows as u64), ..Default::default() }, at));
    r
}

async fn wait_status(deps: &Deps, id: FileId, want: FileStatus) -> StatusRecord {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = deps.storage.statuses.get(id).await.unwrap().unwrap();
        if r.status == want {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "file {id} never reached {want}: {r:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn metric(series: &str) -> f64 {
    txpipe_common::metrics::render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn two_copies_at_once_with_one_failing_never_fail_a_file_that_completes() {
    let dir = tempfile::tempdir().unwrap();
    let settings = txpipe_tests::test_settings(dir.path());
    let deps = Deps::connect(settings.clone()).await.unwrap();
    deps.broker.declare_all().await.unwrap();
    let names = settings.names();

    // a subscriber of every notification
    let ch = deps.broker.channel().await.unwrap();
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let q = ch.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
    ch.queue_bind(
        q.name().clone(),
        names.notifications_exchange().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut notices = ch.basic_consume(q.name().clone(), "tap".into(), no_ack, FieldTable::default()).await.unwrap();

    let duplicates = r#"txpipe_messages_total{outcome="duplicate",stage="transformer"}"#;
    let before = metric(duplicates);
    let waited = r#"txpipe_copies_waited_total{stage="transformer"}"#;
    let mut waits_before = metric(waited);
    let now = chrono::Utc::now();
    let completes = validated_file(&deps, 50, now).await;
    let fails = validated_file(&deps, 5, now).await;
    let gated = Arc::new(Gated {
        inner: txpipe_cli::fleet::handlers(&deps)[1].clone(),
        first_fails: fails.file_id,
        state: Mutex::default(),
        changed: tokio::sync::Notify::new(),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let (deps, stop, handler) = (deps.clone(), stop.clone(), gated.clone());
        async move { txpipe_common::worker::run(&deps, handler, stop.cancelled_owned()).await }
    });

    for file in [&completes, &fails] {
        deps.storage.statuses.create(file).await.unwrap();
        // a duplicate publish: two copies of one message, handled at the same time
        let msg = StageMessage::from_record(RoutingKey::FileValidated, file).outgoing(&names);
        deps.publisher.publish(&msg).await.unwrap();
        deps.publisher.publish(&msg).await.unwrap();
        // the first copy has claimed the file and is held at its gate
        gated.until(file.file_id, |s| s.works >= 1).await;
        // and the second has found the first at work and waits (else, coming after the first
        // failed, it would be a retry, not a duplicate)
        let deadline = tokio::time::Instant::now() + WAIT;
        while metric(waited) < waits_before + 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "the second copy never waited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        waits_before += 1.0;
        gated.with(file.file_id, |s| s.open = true);
    }

    // the copy that completes: every row stored, processed, never failed
    let done = wait_status(&deps, completes.file_id, FileStatus::Processed).await;
    assert_eq!(done.records_processed, Some(50));
    let page = deps.storage.transactions.list_by_file(completes.file_id, 1000, None).await.unwrap();
    assert_eq!(page.items.len(), 50);
    assert!(done.history.iter().all(|h| h.status != FileStatus::ProcessingFailed), "{done:#?}");

    // the copy that fails: failed once, and its duplicate neither retries nor fails it again
    let failed = wait_status(&deps, fails.file_id, FileStatus::ProcessingFailed).await;
    assert!(failed.reason.as_deref().unwrap().contains("the first copy fails"), "{failed:#?}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(duplicates) < before + 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the waiting copy was never settled");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(deps.storage.statuses.get(fails.file_id).await.unwrap().unwrap().status, FileStatus::ProcessingFailed);
    for file in [&completes, &fails] {
        assert_eq!(gated.with(file.file_id, |s| s.works), 1, "one attempt at a time: the other copy never worked");
    }

    // file.failed for the failed file only, once
    let mut failed_notices = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), notices.next()).await {
        let n: Notification = serde_json::from_slice(&d.data).unwrap();
        if d.routing_key.as_str() == "file.failed" {
            failed_notices.push(n.file_id);
        }
    }
    assert_eq!(failed_notices, vec![fails.file_id]);
    assert_eq!(deps.broker.queue_depth(&names.dead_letter_queue()).await.unwrap(), 1, "the failed copy only");
    eprintln!("concurrent copies: 2 files x 2 copies at once, one failing; completed 1 (never failed), failed 1 (one file.failed), DLQ 1");

    stop.cancel();
    worker.await.unwrap().unwrap();
    deps.broker.teardown().await.unwrap();
}

#[tokio::test]
async fn a_storage_outage_longer_than_every_retry_leaves_no_file_stuck_with_default_settings() {
    let moto: std::net::SocketAddr = txpipe_tests::aws::endpoint().trim_start_matches("http://").parse().unwrap();
    let proxy = txpipe_tests::proxy::Proxy::start(moto).await;
    let defaults = Settings::default();
    let fleet = TestFleet::spawn_aws_at(&format!("http://{}", proxy.addr), |s| {
        // the default retries (3 attempts, 2 s then 4 s, with jitter): the outage outlasts them
        s.retry_attempts = defaults.retry_attempts;
        s.retry_initial_delay_ms = defaults.retry_initial_delay_ms;
        s.retry_factor = defaults.retry_factor;
    })
    .await;
    let mut tap = fleet.tap_notifications().await;
    const ROWS: usize = 2000;
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(fleet.upload(valid_csv(&format!("outage{i}"), ROWS)).await.file_id);
    }
    // S3 and DynamoDB go away while both files are in flight, for longer than every retry can
    // reach: each of the waits between attempts (2 s, then 4 s) at most doubled by its jitter,
    // and each attempt's own retries inside the AWS SDK (its standard mode waits up to 1 s,
    // then up to 2 s; 3.5 s with the tries themselves). A shorter outage (16 s) let a third
    // attempt outlive it now and then, and the file completed without failing.
    let waits_ms: f64 = (0..defaults.retry_attempts.saturating_sub(1))
        .map(|k| 2.0 * defaults.retry_initial_delay_ms as f64 * f64::from(defaults.retry_factor).powi(k as i32))
        .sum();
    let outage = Duration::from_millis(waits_ms as u64 + defaults.retry_attempts as u64 * 3_500 + 2_000);
    proxy.refuse(true);
    proxy.cut();
    tokio::time::sleep(outage).await;
    proxy.refuse(false);

    let (mut failed, mut completed) = (0, 0);
    for id in &ids {
        let ends = [
            FileStatus::Completed,
            FileStatus::ValidationFailed,
            FileStatus::ProcessingFailed,
            FileStatus::NotificationFailed,
        ];
        let r = fleet.wait_for_status(*id, &ends).await;
        if r.status != FileStatus::Completed {
            // a failure for a fault, recorded once storage answered again: `txpipe retry` re-drives it
            assert!(!r.is_rejected(), "{r:#?}");
            failed += 1;
            txpipe_cli::dlq::retry(&fleet.deps, *id).await.unwrap();
        }
        let r = fleet.wait_for_status(*id, &[FileStatus::Completed]).await;
        assert_eq!(r.records_processed, Some(ROWS as u64));
        assert_eq!(fleet.transactions(*id, 1000).await.len(), ROWS);
        completed += 1;
    }
    assert!(failed >= 1, "the outage caught no file in flight");
    let notices = tap.drain(Duration::from_secs(2)).await;
    let count = |key: &str| {
        let ids: std::collections::HashSet<_> =
            notices.iter().filter(|n| n.routing_key == key).map(|n| n.message_id.clone()).collect();
        ids.len()
    };
    assert_eq!((count("file.completed"), count("file.failed")), (ids.len(), failed), "{notices:#?}");
    let dlq = fleet.dlq_count().await;
    assert_eq!(dlq as usize, failed, "each failure's message is in the DLQ, nothing else");
    eprintln!(
        "outage (S3+DynamoDB unreachable {:.1} s, default retries): files 2, failed then retried {failed}, \
         completed {completed}, stuck 0, DLQ {dlq}",
        outage.as_secs_f64()
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_file_left_in_a_working_status_with_no_message_is_resumed() {
    let fleet = TestFleet::spawn_with(|s| s.stuck_after_ms = 1000).await;
    let resumed = r#"txpipe_files_resumed_total{stage="transformer"}"#;
    let before = metric(resumed);
    // as a transformer killed mid-file leaves it when its message is gone too: `processing`,
    // held by an attempt whose heartbeat stopped an hour ago
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut r = validated_file(&fleet.deps, 20, hour_ago).await;
    assert!(r.advance(FileStatus::Processing, StatusUpdate::default(), hour_ago));
    r.attempt = Some(Attempt {
        id: "dead".into(),
        started: 1,
        crashes: 0,
        renewed_at: hour_ago,
        live: true,
        alone: false,
        suspect: false,
    });
    fleet.deps.storage.statuses.create(&r).await.unwrap();

    let done = fleet.wait_for_status(r.file_id, &[FileStatus::Completed]).await;
    assert_eq!(done.records_processed, Some(20));
    assert_eq!(fleet.transactions(r.file_id, 1000).await.len(), 20);
    assert!(metric(resumed) >= before + 1.0);
    assert_eq!(fleet.dlq_count().await, 0);
    fleet.shutdown().await;
}
