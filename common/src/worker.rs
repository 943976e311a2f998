//! The consume → admit → work → publish → ack loop, written once for every worker.
//!
//! A worker is a [`Handler`]: it does its stage's own work on a file and says how it ended.
//! Everything else is here, driven by the stage table ([`crate::stage::STAGES`]): parsing each
//! body into its message type at the edge (a body that does not parse is dead-lettered at
//! once), reading the file's status and deciding whether the stage works on it, passes on
//! what it already produced, or refuses it; moving the file to the stage's working and done
//! statuses; retrying transient failures with backoff; recording a failure as the stage's
//! `*_failed` status with a `file.failed` notification; publishing the next message with
//! confirms; and acking only after all that, so a crash at any point means a redelivery,
//! never a loss. A file is worked on by one attempt at a time, which holds its working status
//! with a heartbeat and counts crashes (`crate::attempt`); each worker also sweeps its stage
//! for files stuck without a live attempt (`crate::stuck`).

use crate::amqp::{AmqpError, Broker, Publisher};
use crate::attempt::{Claim, Lease};
use crate::dead_letter::{header, DeadLetterInfo, ErrorClass};
use crate::deps::Deps;
use crate::headers::Headers;
use crate::messages::{Notification, Outgoing, StageMessage};
use crate::metrics::{DeadLettered, FileFinished, InternalEvent, MessageHandled, MessageOutcome, MessageTimed};
use crate::stage::{Admission, NotificationKey, Stage, StageSpec};
use crate::status::{FileStatus, StatusRecord, StatusUpdate};
use crate::storage::{Advance, Change, StorageError};
use async_trait::async_trait;
use backon::BackoffBuilder;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long in-flight messages may run on after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why a handler's work did not succeed, and so what the loop does with the message.
#[derive(Debug)]
pub enum Failure {
    /// Can never succeed: dead-letter it now.
    DeadLetter(String),
    /// Failed for now: try again after a backoff, dead-letter when retries run out.
    Retry(String),
}

impl Failure {
    /// A storage failure: its class decides ([`crate::storage::StorageClass::is_transient`]):
    /// retry what may pass, dead-letter what cannot.
    pub fn storage(what: &str, e: &StorageError) -> Self {
        let reason = format!("{what}: {}", crate::error::Chain(e));
        if e.is_transient() {
            Failure::Retry(reason)
        } else {
            Failure::DeadLetter(reason)
        }
    }

    /// An I/O error while streaming an object on the blocking pool: a storage error it carries
    /// (from `open_blocking`) by its class, anything else (the stream breaking mid-read) retried.
    pub fn read(what: &str, e: &std::io::Error) -> Self {
        match StorageError::in_io(e) {
            Some(storage) => Self::storage(what, storage),
            None => Failure::Retry(format!("{what}: {}", crate::error::Chain(e))),
        }
    }
}

/// How a stage's work on a file ended.
#[derive(Debug)]
pub enum Step {
    /// Move the file to this status, recording the update; the loop then publishes the
    /// message that announces the new status, if it has one.
    Advance(FileStatus, StatusUpdate),
    /// The handler made that move itself, with the last write of its work (see
    /// `TransactionStore::write_then`): what it came to.
    Moved(Advance),
    /// Leave the status as it is (an observed message).
    Stay,
}

/// The working status a file passes through unclaimed, and since when (see
/// [`StageSpec::holds_file`]); None when the loop claimed the file, or the stage holds none.
/// The loop puts it in the update of a [`Step::Advance`]; a handler that moves the file
/// itself puts it in its own ([`crate::status::StatusUpdate::passed`]).
pub type Passed = Option<(FileStatus, chrono::DateTime<chrono::Utc>)>;

/// One worker stage's own work. The loop has parsed the message, checked that it is one of
/// the stage's inputs, read the file's record and admitted it (see
/// [`StageSpec::admit`]), and moved the file to the stage's working status (unless the stage
/// does without a claim for this file: see [`StageSpec::holds_file`]).
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    fn stage(&self) -> Stage;

    /// The file's record when a message arrives; `Ok(None)`: nothing to do (the message is
    /// acked). By default the status table's record, and a message about an unknown file is
    /// dead-lettered.
    async fn record(&self, deps: &Deps, msg: &StageMessage) -> Result<Option<StatusRecord>, Failure> {
        let file_id = msg.file_id();
        match deps.storage.statuses.get(file_id).await {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => Err(Failure::DeadLetter(format!("no status record for file {file_id}"))),
            Err(e) => Err(Failure::storage("reading the file's status", &e)),
        }
    }

    /// Does the stage's work on an admitted file.
    async fn work(&self, msg: &StageMessage, record: &StatusRecord, passed: Passed) -> Result<Step, Failure>;
}

/// Consumes the handler's stage queue until `shutdown` resolves, then lets in-flight messages
/// finish (up to [`SHUTDOWN_GRACE`]). When the broker connection drops, it waits for the
/// [`Broker`] to reconnect, then declares its queues, sets QoS and consumes again (messages in
/// flight on the old connection are redelivered by the broker). Returns an error only when
/// reconnecting was given up.
pub async fn run(deps: &Deps, handler: Arc<dyn Handler>, shutdown: impl Future<Output = ()>) -> Result<(), AmqpError> {
    let stage = handler.stage();
    let broker = &deps.broker;
    // a confirm channel of its own, so its publishes do not queue behind the service's others
    let publisher = broker.publisher().await?;
    let stopping = CancellationToken::new();
    let ctx = Arc::new(Loop {
        deps: deps.clone(),
        spec: stage.spec(),
        handler,
        publisher: publisher.clone(),
        solo: Arc::new(RwLock::new(())),
        stopping: stopping.clone(),
    });
    let sweeper =
        tokio::spawn(crate::stuck::run(deps.clone(), stage.spec(), publisher, stopping.clone().cancelled_owned()));
    let _stop_sweeper = stopping.clone().drop_guard();
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let result = loop {
        let subscribed = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            s = subscribe(broker, stage, deps.settings.prefetch) => s,
        };
        let (channel, tag, mut consumer) = match subscribed {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%stage, error = %e, "cannot consume; waiting for the broker");
                // the supervisor may not have noticed the loss yet: do not spin
                tokio::time::sleep(Duration::from_millis(250)).await;
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    up = broker.wait_up() => if let Err(e) = up { break Err(e) },
                }
                continue;
            }
        };
        let stop = loop {
            tokio::select! {
                _ = &mut shutdown => break true,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = done { tracing::error!(%stage, error = %e, "message task failed; the message will be redelivered"); }
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => { let ctx = ctx.clone(); tasks.spawn(async move { ctx.process(delivery).await }); }
                    Some(Err(e)) => { tracing::warn!(%stage, error = %e, "consumer failed"); break false }
                    None => { tracing::warn!(%stage, "consumer ended"); break false }
                }
            }
        };
        if stop {
            // copies waiting for another attempt give their messages back at once
            stopping.cancel();
            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
            drain(stage, &mut tasks).await;
            let _ = channel.close(200, "bye".into()).await;
            break Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            up = broker.wait_up() => if let Err(e) = up { break Err(e) },
        }
    };
    stopping.cancel();
    drain(stage, &mut tasks).await;
    let _ = sweeper.await;
    // closed now, not when its last handle goes: see Publisher::close
    ctx.publisher.close().await;
    result
}

/// Declares the stage's queues (again: the broker may have lost them), sets QoS, consumes.
async fn subscribe(
    broker: &Broker,
    stage: Stage,
    prefetch: u16,
) -> Result<(lapin::Channel, String, lapin::Consumer), AmqpError> {
    broker.declare_for(crate::stage::Service::Worker(stage)).await?;
    let queue = broker.names().queue(stage);
    let channel = broker.channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let tag = format!("{}-{}", stage, uuid::Uuid::new_v4().simple());
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(%stage, %queue, prefetch, "consuming");
    Ok((channel, tag, consumer))
}

/// Lets in-flight messages finish, up to the grace period; the rest are redelivered.
async fn drain(stage: Stage, tasks: &mut JoinSet<()>) {
    if tasks.is_empty() {
        return;
    }
    tracing::info!(%stage, in_flight = tasks.len(), "waiting for in-flight messages");
    if tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(%stage, "grace period over; unfinished messages will be redelivered");
        tasks.abort_all();
    }
}

/// Records how long a message took, however its handling ended.
struct Timer(Stage, std::time::Instant);

impl Drop for Timer {
    fn drop(&mut self) {
        MessageTimed { stage: self.0, seconds: self.1.elapsed().as_secs_f64() }.emit();
    }
}

/// Acks, nacks or rejects, giving up after a while on a connection that no longer answers
/// (the broker then redelivers the message on the next connection).
async fn settle(op: impl Future<Output = Result<bool, lapin::Error>>) -> Result<bool, String> {
    match tokio::time::timeout(crate::amqp::CONFIRM_TIMEOUT, op).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer from RabbitMQ".into()),
    }
}

struct Loop {
    deps: Deps,
    spec: &'static StageSpec,
    handler: Arc<dyn Handler>,
    publisher: Publisher,
    /// Held shared by every attempt, and exclusively by an attempt on a suspect file (one an
    /// earlier attempt died on), so a crash while it runs is that file's alone.
    solo: Arc<RwLock<()>>,
    /// Cancelled on shutdown: copies waiting for another attempt give their messages back.
    stopping: CancellationToken,
}

/// How one try at a message ended, when it did not fail.
enum Outcome {
    /// Publish these, then ack.
    Publish(Vec<Outgoing>),
    /// Ack, nothing else: a copy of a message whose file another attempt answers for.
    Duplicate(String),
    /// Attempts crashed on the file `TXPIPE_DELIVERY_LIMIT` times: it was failed; announce it
    /// and dead-letter the message.
    Poisoned(Box<StatusRecord>),
    /// Leave the message unsettled (shutdown while waiting): the broker delivers it again.
    Abandon,
}

/// What claiming a file for an attempt came to.
enum Claimed {
    /// The file is this attempt's; the guard keeps its place in the worker (shared or alone).
    Mine(StatusRecord, Guard),
    Poisoned(StatusRecord),
    /// The file no longer lets this stage start; `waited`: this copy waited for another attempt.
    Lost {
        record: StatusRecord,
        waited: bool,
    },
    Stopping,
    /// The file has no status record.
    Missing,
}

/// An attempt's hold on [`Loop::solo`]; held, never read.
enum Guard {
    Shared { _held: OwnedRwLockReadGuard<()> },
    Alone { _held: OwnedRwLockWriteGuard<()> },
}

/// How recording a stage's failure went.
#[derive(PartialEq, Eq)]
enum Recorded {
    /// Moved to the stage's failed status (and announced, if asked).
    Failed,
    /// Another attempt is live on the file: it decides how the file ends.
    HeldByOther,
    /// The file is past this stage (or unknown): nothing to record.
    Moot,
    /// Storage could not be reached.
    Unreachable,
}

impl Loop {
    fn stage(&self) -> Stage {
        self.spec.stage
    }

    fn stuck_after(&self) -> Duration {
        Duration::from_millis(self.deps.settings.stuck_after_ms)
    }

    /// The lease rules as this attempt sees them now.
    fn lease(&self, id: &str, alone: bool, may_retry: bool) -> Lease {
        let now = chrono::Utc::now();
        Lease {
            spec: self.spec,
            id: id.to_owned(),
            now,
            stale_before: now - chrono::Duration::from_std(self.stuck_after()).unwrap_or(chrono::Duration::MAX),
            alone,
            crash_limit: self.deps.settings.delivery_limit,
            may_retry,
        }
    }

    /// Handles one delivery in the trace it carries (or a new one).
    async fn process(&self, delivery: Delivery) {
        let trace = Headers::of(&delivery)
            .text(crate::trace::HEADER)
            .and_then(|v| crate::trace::TraceContext::parse(&v))
            .unwrap_or_else(crate::trace::TraceContext::start);
        // the exported span, with OpenTelemetry's messaging attributes for RabbitMQ
        let queue = self.deps.broker.names().queue(self.stage());
        let message_id = delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
        let span = tracing::info_span!(
            target: crate::telemetry::OTEL_TARGET,
            "process",
            otel.name = %format!("{queue} process"),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation = "process",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %queue,
            messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
            messaging.message.id = %message_id,
            txpipe.stage = %self.stage(),
        );
        trace.scope_in(span, self.stage().as_str(), self.process_traced(delivery)).await
    }

    async fn process_traced(&self, delivery: Delivery) {
        let stage = self.stage();
        let routing_key = delivery.routing_key.as_str();
        let msg = match StageMessage::parse(routing_key, &delivery.data) {
            Ok(m) => m,
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(%stage, %routing_key, %reason, "dead-lettering a message that cannot be parsed");
                self.dead_letter(&delivery, ErrorClass::Malformed, &reason).await;
                MessageHandled { stage, outcome: MessageOutcome::Malformed }.emit();
                return;
            }
        };
        let key = msg.routing_key();
        if !self.spec.inputs().any(|k| k == key) {
            let reason = format!("the {stage} does not handle routing key {key}");
            tracing::warn!(%stage, %reason, "dead-lettering");
            self.dead_letter(&delivery, ErrorClass::Permanent, &reason).await;
            MessageHandled { stage, outcome: MessageOutcome::DeadLettered }.emit();
            return;
        }
        let file_id = msg.file_id();
        crate::trace::set_attribute("file_id", &file_id.to_string());
        let tracks_status = self.spec.tracks_status(key);
        if let Some(n) = Headers::of(&delivery).u64("x-delivery-count") {
            tracing::info!(%stage, %file_id, deliveries = n + 1, "redelivered message");
        }
        // one id per delivery: its in-process retries are the same attempt, a redelivery is not
        let attempt_id = uuid::Uuid::new_v4().simple().to_string();
        // published by the stuck-file sweep: it resumes a file in its working status, never
        // restarts one that failed meanwhile
        let resumed = Headers::of(&delivery).text(header::RESUMED).is_some();
        let mut backoff = self.deps.settings.retry_policy().build();
        let _timer = Timer(stage, std::time::Instant::now());
        loop {
            let attempt = AssertUnwindSafe(self.attempt(&msg, &attempt_id, resumed)).catch_unwind().await;
            let Ok(result) = attempt else {
                tracing::error!(%stage, %file_id, "the handler panicked");
                MessageHandled { stage, outcome: MessageOutcome::Panicked }.emit();
                self.after_crash(&delivery, &msg, &attempt_id).await;
                return;
            };
            let (class, reason) = match result {
                Ok(Outcome::Publish(out)) => match self.publish_all(&out).await {
                    Ok(()) => {
                        self.ack(&delivery, file_id).await;
                        MessageHandled { stage, outcome: MessageOutcome::Done }.emit();
                        return;
                    }
                    Err(e) => (ErrorClass::RetriesExhausted, format!("publishing the next message failed: {e}")),
                },
                Ok(Outcome::Duplicate(why)) => {
                    tracing::info!(%stage, %file_id, %why, "acking a copy another attempt answers for");
                    self.ack(&delivery, file_id).await;
                    MessageHandled { stage, outcome: MessageOutcome::Duplicate }.emit();
                    return;
                }
                Ok(Outcome::Poisoned(record)) => {
                    let reason = record.reason.clone().unwrap_or_default();
                    tracing::error!(%stage, %file_id, %reason, "dead-lettering a file its worker keeps crashing on");
                    self.announce_failure(&record).await;
                    self.dead_letter(&delivery, ErrorClass::DeliveryLimit, &reason).await;
                    MessageHandled { stage, outcome: MessageOutcome::DeadLettered }.emit();
                    return;
                }
                Ok(Outcome::Abandon) => {
                    MessageHandled { stage, outcome: MessageOutcome::Abandoned }.emit();
                    return;
                }
                Err(Failure::DeadLetter(reason)) => (ErrorClass::Permanent, reason),
                Err(Failure::Retry(reason)) => (ErrorClass::RetriesExhausted, reason),
            };
            // the connection went away under this message: it is not the message's fault, and
            // the broker will deliver it again on the next connection
            if delivery.acker.poisoned() || !self.deps.broker.is_connected() {
                tracing::warn!(%stage, %file_id, %reason, "broker connection lost mid-message; it will be redelivered");
                if tracks_status {
                    // free the file for that redelivery at once (not counted: no crash)
                    self.release(file_id, &attempt_id, false).await;
                }
                MessageHandled { stage, outcome: MessageOutcome::Abandoned }.emit();
                return;
            }
            if class == ErrorClass::RetriesExhausted {
                if let Some(wait) = backoff.next() {
                    tracing::warn!(%stage, %file_id, %reason, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
                    MessageHandled { stage, outcome: MessageOutcome::Retried }.emit();
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            let mut hold = backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(30))
                .without_max_times()
                .build();
            if tracks_status {
                loop {
                    match self.record_failure(&msg, &attempt_id, &reason, true).await {
                        Recorded::HeldByOther => {
                            tracing::info!(%stage, %file_id, %reason, "another attempt holds the file and decides how it ends; acking this copy");
                            self.ack(&delivery, file_id).await;
                            MessageHandled { stage, outcome: MessageOutcome::Duplicate }.emit();
                            return;
                        }
                        // storage is down: keep the message until the failure is recorded, so the
                        // file never sits in a status no message will move it from (the DLQ would
                        // hold its only message)
                        Recorded::Unreachable => {
                            let wait = hold.next().unwrap_or(Duration::from_secs(30));
                            tracing::warn!(%stage, %file_id, retry_in_ms = wait.as_millis() as u64,
                                "cannot record the failure; holding the message until storage answers");
                            tokio::select! {
                                _ = self.stopping.cancelled() => {}
                                _ = tokio::time::sleep(wait) => {}
                            }
                            if self.stopping.is_cancelled()
                                || delivery.acker.poisoned()
                                || !self.deps.broker.is_connected()
                            {
                                // the broker delivers it again; the file's hold goes stale and is taken over
                                MessageHandled { stage, outcome: MessageOutcome::Abandoned }.emit();
                                return;
                            }
                            let lease = self.lease(&attempt_id, false, false);
                            let _ = self.deps.storage.statuses.update(file_id, Arc::new(move |r| lease.renew(r))).await;
                        }
                        Recorded::Failed | Recorded::Moot => break,
                    }
                }
            }
            tracing::error!(%stage, %file_id, class = class.as_str(), %reason, "dead-lettering");
            self.dead_letter(&delivery, class, &reason).await;
            MessageHandled { stage, outcome: MessageOutcome::DeadLettered }.emit();
            return;
        }
    }

    async fn ack(&self, delivery: &Delivery, file_id: crate::FileId) {
        if let Err(e) = settle(delivery.ack(BasicAckOptions::default())).await {
            tracing::warn!(stage = %self.stage(), %file_id, error = %e, "ack failed; the message will be redelivered");
        }
    }

    /// After a crash caught in the handler. If this attempt held the file, the crash is counted
    /// in its record (and the file freed for the next delivery at once), and the message goes
    /// back to its queue: the next claim fails the file once the count reaches the limit.
    /// Otherwise (a message that moves no file, or a crash before the claim) the count travels
    /// in a header of a copy put back at the end of the queue, so it holds whatever the broker
    /// counts (from RabbitMQ 4.3 a requeueing nack counts nothing).
    async fn after_crash(&self, delivery: &Delivery, msg: &StageMessage, attempt_id: &str) {
        let (stage, file_id) = (self.stage(), msg.file_id());
        if self.spec.tracks_status(msg.routing_key()) && self.release(file_id, attempt_id, true).await {
            tracing::warn!(%stage, %file_id, "crash counted on the file; returning the message to its queue");
            if let Err(e) = settle(delivery.nack(BasicNackOptions { requeue: true, ..Default::default() })).await {
                tracing::warn!(%stage, %file_id, error = %e, "nack failed; the message will be redelivered");
            }
            return;
        }
        let crashes = Headers::of(delivery).u64(header::CRASHES).unwrap_or(0) + 1;
        let limit = u64::from(self.deps.settings.delivery_limit);
        if crashes >= limit {
            let reason = format!(
                "delivery_limit: the {stage} crashed {crashes} time(s) on this message (TXPIPE_DELIVERY_LIMIT is {limit})"
            );
            tracing::error!(%stage, %file_id, %reason, "dead-lettering");
            // a file this stage moves without a claim (a small one) is failed here, as its claim
            // would have failed it: its record says why and subscribers hear `file.failed`
            if self.spec.tracks_status(msg.routing_key()) {
                let _ = self.record_failure(msg, attempt_id, &reason, true).await;
            }
            self.dead_letter(delivery, ErrorClass::DeliveryLimit, &reason).await;
            return;
        }
        let mut headers: Vec<(String, String)> = Headers::of(delivery)
            .texts()
            .filter(|(k, _)| !DeadLetterInfo::is_bookkeeping(k) && k != crate::trace::HEADER)
            .collect();
        headers.push((header::CRASHES.into(), crashes.to_string()));
        let copy = Outgoing {
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            body: delivery.data.clone(),
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_else(|| msg.message_id()),
            mandatory: true,
            headers,
        };
        let settled = match self.publisher.publish(&copy).await {
            Ok(()) => settle(delivery.ack(BasicAckOptions::default())).await,
            Err(e) => {
                tracing::warn!(%stage, %file_id, error = %e, "cannot put back a counted copy; returning the message instead");
                settle(delivery.nack(BasicNackOptions { requeue: true, ..Default::default() })).await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(%stage, %file_id, error = %e, "settling a crashed message failed; it will be redelivered");
        }
    }

    /// One try at a message: claim the file (the claim reads the record and admits the message
    /// in the same atomic change: one storage call, no separate read), move it through the
    /// stage, and say what to do with the message. An observed message (the notifier's
    /// `file.rejected`) moves nothing: it only reads the record.
    async fn attempt(&self, msg: &StageMessage, attempt_id: &str, resumed: bool) -> Result<Outcome, Failure> {
        let (stage, file_id) = (self.stage(), msg.file_id());
        if let Some(stored) = msg.stored() {
            // the record as its publisher stored it: the claim's base, checked by its condition
            self.deps.storage.statuses.hint(file_id, stored.clone());
        }
        if self.spec.observes.is_some_and(|(key, _)| key == msg.routing_key()) {
            let Some(record) = self.handler.record(&self.deps, msg).await? else {
                return Ok(Outcome::Publish(Vec::new()));
            };
            return match self.spec.admit(msg.routing_key(), &record) {
                Admission::Refuse(why) => Err(Failure::DeadLetter(why)),
                _ => self.settle_step(msg, self.handler.work(msg, &record, None).await?, None).await,
            };
        }
        // a fresh file moves from `from` to `done` in one write, without a claim (a copy
        // racing this one finds the move made and passes it on), when holding it would buy
        // nothing: at a stage that does not hold files, and for a file small enough to travel
        // in its message, whose work is done in memory in a moment (a claim would cost a
        // status write, and a wait for it, for a status hardly anyone could see)
        if !self.spec.holds_file || msg.content().is_some() {
            // the record this process wrote when the file reached `from` is that status's
            // record (a status's fields do not change until the next status): no read needed
            let remembered = self.deps.storage.statuses.remembered(file_id).filter(|r| r.status == self.spec.from);
            let record = match remembered {
                Some(r) => Some(r),
                // the work must not start from a record the message carried (client input until
                // a write's condition has checked it whole): in a split deployment, where the
                // message carries one, the claim starts from it, which costs no more than a read
                None if self.spec.holds_file && msg.stored().is_some() => None,
                None => match self.handler.record(&self.deps, msg).await? {
                    Some(r) => Some(r),
                    None => return Ok(Outcome::Publish(Vec::new())),
                },
            };
            let light =
                |r: &StatusRecord| r.status == self.spec.from && (!self.spec.holds_file || msg.carried(r).is_some());
            if let Some(record) = record.filter(light) {
                // the history still shows when the stage took the file up
                let passed = self.spec.holds_file.then(|| (self.spec.working, chrono::Utc::now()));
                let _shared = self.solo.clone().read_owned().await;
                let step = self.handler.work(msg, &record, passed).await?;
                return self.settle_step(msg, step, passed).await;
            }
        }
        let (record, _guard) = match self.claim(file_id, attempt_id, resumed).await? {
            Claimed::Mine(record, guard) => (record, guard),
            Claimed::Poisoned(record) => return Ok(Outcome::Poisoned(Box::new(record))),
            Claimed::Stopping => return Ok(Outcome::Abandon),
            Claimed::Lost { record, waited } => {
                if let Admission::PassOn = self.spec.admit(msg.routing_key(), &record) {
                    tracing::info!(%stage, %file_id, status = %record.status, "already past this stage; passing on its result");
                }
                return self.lost(msg, record, waited || resumed);
            }
            // no record: what that means is the handler's to say (the validator: an upload the
            // gateway withdrew; elsewhere: an inconsistency for the DLQ)
            Claimed::Missing => {
                return match self.handler.record(&self.deps, msg).await? {
                    None => Ok(Outcome::Publish(Vec::new())),
                    Some(_) => {
                        Err(Failure::Retry(format!("the record of file {file_id} came and went while claiming it")))
                    }
                }
            }
        };
        // held until the outcome is recorded
        let step = tokio::select! {
            biased;
            step = self.handler.work(msg, &record, None) => step?,
            never = self.heartbeat(file_id, attempt_id) => match never {},
        };
        self.settle_step(msg, step, None).await
    }

    /// Records how the stage's work on `msg`'s file ended and says what to publish; `passed`:
    /// the working status it went through unclaimed, and since when (see `StatusUpdate`).
    async fn settle_step(&self, msg: &StageMessage, step: Step, passed: Passed) -> Result<Outcome, Failure> {
        match step {
            Step::Stay => Ok(Outcome::Publish(Vec::new())),
            Step::Moved(moved) => {
                let record = self.moved(moved);
                Ok(Outcome::Publish(self.announcing(&record, msg)))
            }
            Step::Advance(to, update) => {
                let record = self.advance(msg.file_id(), to, StatusUpdate { passed, ..update }).await?;
                Ok(Outcome::Publish(self.announcing(&record, msg)))
            }
        }
    }

    /// Takes the file into the stage's working status for this attempt, waiting while another
    /// attempt is live on it, and taking the worker alone if an earlier attempt died on it.
    async fn claim(&self, file_id: crate::FileId, attempt_id: &str, resumed: bool) -> Result<Claimed, Failure> {
        let stage = self.stage();
        let (mut alone, mut waited) = (false, false);
        let mut guard = Guard::Shared { _held: self.solo.clone().read_owned().await };
        loop {
            let lease = self.lease(attempt_id, alone, !waited && !resumed);
            let found = Arc::new(std::sync::Mutex::new(Claim::Moved));
            let change: Change = {
                let found = found.clone();
                Arc::new(move |r| {
                    let claim = lease.claim(r);
                    *found.lock().unwrap_or_else(|p| p.into_inner()) = claim;
                    claim.changed()
                })
            };
            let record = match self.deps.storage.statuses.update(file_id, change).await {
                Ok(Advance::Moved(r) | Advance::Refused(r)) => r,
                Err(e) if e.kind() == crate::storage::StorageErrorKind::NotFound => return Ok(Claimed::Missing),
                Err(e) => return Err(Failure::storage("claiming the file", &e)),
            };
            let claim = *found.lock().unwrap_or_else(|p| p.into_inner());
            match claim {
                Claim::Claimed => return Ok(Claimed::Mine(record, guard)),
                Claim::Poisoned => {
                    FileFinished { status: record.status }.emit();
                    return Ok(Claimed::Poisoned(record));
                }
                Claim::Moved => return Ok(Claimed::Lost { record, waited }),
                Claim::NeedsAlone => {
                    tracing::warn!(%stage, %file_id, "an earlier attempt died on this file; working on it alone");
                    drop(guard);
                    guard = Guard::Alone { _held: self.solo.clone().write_owned().await };
                    alone = true;
                }
                Claim::Busy => {
                    if !waited {
                        crate::metrics::CopyWaited { stage, file_id }.emit();
                    }
                    waited = true;
                    // never wait holding a place in the worker
                    drop(guard);
                    let poll = (self.stuck_after() / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
                    tokio::select! {
                        _ = self.stopping.cancelled() => return Ok(Claimed::Stopping),
                        _ = tokio::time::sleep(poll) => {}
                    }
                    guard = if alone {
                        Guard::Alone { _held: self.solo.clone().write_owned().await }
                    } else {
                        Guard::Shared { _held: self.solo.clone().read_owned().await }
                    };
                }
            }
        }
    }

    /// The file's status changed before this attempt could claim it. `no_retry`: this copy
    /// waited for another attempt, or was published by the sweep to resume a working file.
    fn lost(&self, msg: &StageMessage, record: StatusRecord, no_retry: bool) -> Result<Outcome, Failure> {
        let file_id = record.file_id;
        if no_retry && record.status == self.spec.failed {
            // another attempt gave up on the file (its message is in the DLQ): this copy is its
            // duplicate, not a retry
            return Ok(Outcome::Duplicate(format!("another attempt failed file {file_id}")));
        }
        match self.spec.admit(msg.routing_key(), &record) {
            Admission::PassOn => Ok(Outcome::Publish(self.announcing(&record, msg))),
            Admission::Refuse(why) => Err(Failure::DeadLetter(why)),
            _ => Err(Failure::Retry(format!(
                "the status of file {file_id} changed while claiming it ({})",
                record.status
            ))),
        }
    }

    /// Renews this attempt's hold on the file every quarter of `TXPIPE_STUCK_AFTER_MS` while
    /// its work runs (never returns; dropped with the work).
    async fn heartbeat(&self, file_id: crate::FileId, attempt_id: &str) -> Infallible {
        let every = self.stuck_after() / 4;
        loop {
            tokio::time::sleep(every).await;
            let lease = self.lease(attempt_id, false, false);
            match self.deps.storage.statuses.update(file_id, Arc::new(move |r| lease.renew(r))).await {
                Ok(Advance::Moved(_)) => {}
                Ok(Advance::Refused(r)) => {
                    // taken over after missed heartbeats: the work goes on (writes are keyed, so
                    // two attempts write the same rows), but only the holder may fail the file
                    tracing::warn!(stage = %self.stage(), %file_id, status = %r.status, "this attempt no longer holds the file");
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(stage = %self.stage(), %file_id, error = %crate::error::Chain(&e), "heartbeat failed")
                }
            }
        }
    }

    /// Ends this attempt's hold without an outcome (`crashed`: counted as a crash on the file);
    /// true if it held the file.
    async fn release(&self, file_id: crate::FileId, attempt_id: &str, crashed: bool) -> bool {
        let lease = self.lease(attempt_id, false, false);
        match self.deps.storage.statuses.update(file_id, Arc::new(move |r| lease.release(r, crashed))).await {
            Ok(Advance::Moved(_)) => true,
            Ok(Advance::Refused(_)) => false,
            Err(e) => {
                tracing::warn!(stage = %self.stage(), %file_id, error = %crate::error::Chain(&e),
                    "cannot release the file; another copy takes it over once TXPIPE_STUCK_AFTER_MS has passed");
                false
            }
        }
    }

    /// Moves the file forward; a refused move (another copy got there first) is not an error.
    async fn advance(
        &self,
        file_id: crate::FileId,
        to: FileStatus,
        update: StatusUpdate,
    ) -> Result<StatusRecord, Failure> {
        match self.deps.storage.statuses.advance(file_id, to, update, chrono::Utc::now()).await {
            Ok(advance) => Ok(self.moved(advance)),
            Err(e) => Err(Failure::storage(&format!("recording status {to}"), &e)),
        }
    }

    /// The record after a move, made or refused (another copy got there first).
    fn moved(&self, advance: Advance) -> StatusRecord {
        match advance {
            Advance::Moved(r) => {
                if r.status.is_final() {
                    FileFinished { status: r.status }.emit();
                }
                r
            }
            Advance::Refused(r) => r,
        }
    }

    /// The message this stage publishes about where the file now stands, if any; it carries
    /// on the file's bytes if `msg` (the message being handled) carried them, and the record
    /// as this process stored it, if the store has a use for that (the next stage's claim).
    fn announcing(&self, record: &StatusRecord, msg: &StageMessage) -> Vec<Outgoing> {
        let stored = || self.deps.storage.statuses.stored(record.file_id);
        StageMessage::announcing(record)
            .filter(|m| self.spec.publishes.contains(&m.routing_key()))
            .map(|m| m.with_content(msg.content().cloned()).with_stored(stored).outgoing(&self.deps.names))
            .into_iter()
            .collect()
    }

    async fn publish_all(&self, out: &[Outgoing]) -> Result<(), AmqpError> {
        for m in out {
            self.publisher.publish(m).await?;
        }
        Ok(())
    }

    /// Records that the stage failed on the file (its `*_failed` status with the reason) and,
    /// if `notify`, tells subscribers (`file.failed`); unless another attempt is live on the
    /// file. Called on the way to the DLQ; while storage cannot be reached the caller holds the
    /// message and calls again.
    async fn record_failure(&self, msg: &StageMessage, attempt_id: &str, reason: &str, notify: bool) -> Recorded {
        let (stage, file_id) = (self.stage(), msg.file_id());
        let update = StatusUpdate { reason: Some(format!("{stage}: {reason}")), ..Default::default() };
        let lease = self.lease(attempt_id, false, false);
        let change: Change = Arc::new(move |r| lease.fail(r, update.clone()));
        match self.deps.storage.statuses.update(file_id, change).await {
            Ok(Advance::Moved(record)) => {
                FileFinished { status: record.status }.emit();
                if notify {
                    self.announce_failure(&record).await;
                } else {
                    tracing::info!(%file_id, status = %record.status, "failure recorded");
                }
                Recorded::Failed
            }
            Ok(Advance::Refused(record)) if record.status == self.spec.working => Recorded::HeldByOther,
            Ok(Advance::Refused(record)) => {
                tracing::info!(%file_id, status = %record.status, "file already past this stage; status left as is");
                Recorded::Moot
            }
            Err(e) => {
                tracing::warn!(%file_id, error = %crate::error::Chain(&e), "cannot record the failure in the status table");
                if e.is_transient() {
                    Recorded::Unreachable
                } else {
                    Recorded::Moot
                }
            }
        }
    }

    /// Publishes `file.failed` for a file just moved to a failed status.
    async fn announce_failure(&self, record: &StatusRecord) {
        let note = Notification::of(record, record.status).outgoing(NotificationKey::Failed, &self.deps.names);
        if let Err(e) = self.publisher.publish(&note).await {
            tracing::warn!(file_id = %record.file_id, error = %e, "cannot publish the file.failed notification");
        }
    }

    /// Copies the message to the dead-letter exchange with headers saying why, then acks it.
    /// If that copy cannot be made, rejects it so RabbitMQ dead-letters it itself.
    async fn dead_letter(&self, delivery: &Delivery, class: ErrorClass, reason: &str) {
        let stage = self.stage();
        DeadLettered { stage, class }.emit();
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_else(|| format!("dead-letter:{}", uuid::Uuid::new_v4()));
        let info = DeadLetterInfo {
            stage,
            class,
            reason: reason.to_owned(),
            original_exchange: delivery.exchange.to_string(),
            original_routing_key: delivery.routing_key.to_string(),
            dead_lettered_at: chrono::Utc::now(),
        };
        let copy = Outgoing {
            exchange: self.deps.names.dead_letter_exchange(),
            routing_key: delivery.routing_key.to_string(),
            body: delivery.data.clone(),
            message_id,
            mandatory: true,
            headers: info.encode(),
        };
        let settled = match self.publisher.publish(&copy).await {
            Ok(()) => settle(delivery.ack(BasicAckOptions::default())).await,
            Err(e) => {
                tracing::warn!(%stage, error = %e, "cannot copy to the dead-letter exchange; rejecting instead");
                settle(delivery.reject(BasicRejectOptions { requeue: false })).await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(%stage, error = %e, "settling a dead-lettered message failed; it will be redelivered");
        }
    }
}
