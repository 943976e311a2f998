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
//! never a loss.

use crate::amqp::{AmqpError, Broker, Publisher};
use crate::dead_letter::{DeadLetterInfo, ErrorClass};
use crate::deps::Deps;
use crate::headers::Headers;
use crate::messages::{Notification, Outgoing, StageMessage};
use crate::metrics::{DeadLettered, FileFinished, InternalEvent, MessageHandled, MessageOutcome, MessageTimed};
use crate::stage::{Admission, NotificationKey, Stage, StageSpec};
use crate::status::{FileStatus, StatusRecord, StatusUpdate};
use crate::storage::{Advance, StorageError};
use async_trait::async_trait;
use backon::BackoffBuilder;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

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
    /// Leave the status as it is (an observed message).
    Stay,
}

/// One worker stage's own work. The loop has parsed the message, checked that it is one of
/// the stage's inputs, read the file's record and admitted it (see
/// [`StageSpec::admit`]), and moved the file to the stage's working status.
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
    async fn work(&self, msg: &StageMessage, record: &StatusRecord) -> Result<Step, Failure>;
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
    let ctx = Arc::new(Loop { deps: deps.clone(), spec: stage.spec(), handler, publisher });
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
    drain(stage, &mut tasks).await;
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
}

impl Loop {
    fn stage(&self) -> Stage {
        self.spec.stage
    }

    /// Handles one delivery in the trace it carries (or a new one).
    async fn process(&self, delivery: Delivery) {
        let trace = Headers::of(&delivery)
            .text(crate::trace::HEADER)
            .and_then(|v| crate::trace::TraceContext::parse(&v))
            .unwrap_or_else(crate::trace::TraceContext::start);
        trace.scope(self.stage().as_str(), self.process_traced(delivery)).await
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
        let tracks_status = self.spec.tracks_status(key);
        let mut last_delivery = None;
        if let Some(n) = Headers::of(&delivery).u64("x-delivery-count") {
            tracing::info!(%stage, %file_id, deliveries = n + 1, "redelivered message");
            if n >= u64::from(self.deps.settings.delivery_limit) && tracks_status {
                // a crash on this last delivery leaves no other chance to say why
                let reason = format!(
                    "delivery_limit: the message was delivered {} times without being settled (did it crash the worker?); \
                     if this last attempt fails too, RabbitMQ dead-letters it",
                    n + 1
                );
                self.record_failure(&msg, &reason, false).await;
                last_delivery = Some(reason);
            }
        }
        let mut backoff = self.deps.settings.retry_policy().build();
        let _timer = Timer(stage, std::time::Instant::now());
        loop {
            let attempt = AssertUnwindSafe(self.attempt(&msg)).catch_unwind().await;
            let Ok(result) = attempt else {
                // a crash in the handler: give the message back (its delivery count grows, so a
                // message that always crashes ends in the DLQ at the delivery limit)
                tracing::error!(%stage, %file_id, "the handler panicked; returning the message to its queue");
                MessageHandled { stage, outcome: MessageOutcome::Panicked }.emit();
                if let Some(reason) = &last_delivery {
                    // the attempt may have moved the file on before it crashed: RabbitMQ
                    // dead-letters the message now, so the file ends failed
                    self.record_failure(&msg, reason, false).await;
                }
                if let Err(e) = settle(delivery.nack(BasicNackOptions { requeue: true, ..Default::default() })).await {
                    tracing::warn!(%stage, %file_id, error = %e, "nack failed; the message will be redelivered");
                }
                return;
            };
            let (class, reason) = match result {
                Ok(out) => match self.publish_all(&out).await {
                    Ok(()) => {
                        if let Err(e) = settle(delivery.ack(BasicAckOptions::default())).await {
                            tracing::warn!(%stage, %file_id, error = %e, "ack failed; the message will be redelivered");
                        }
                        MessageHandled { stage, outcome: MessageOutcome::Done }.emit();
                        return;
                    }
                    Err(e) => (ErrorClass::RetriesExhausted, format!("publishing the next message failed: {e}")),
                },
                Err(Failure::DeadLetter(reason)) => (ErrorClass::Permanent, reason),
                Err(Failure::Retry(reason)) => (ErrorClass::RetriesExhausted, reason),
            };
            // the connection went away under this message: it is not the message's fault, and
            // the broker will deliver it again on the next connection
            if delivery.acker.poisoned() || !self.deps.broker.is_connected() {
                tracing::warn!(%stage, %file_id, %reason, "broker connection lost mid-message; it will be redelivered");
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
            tracing::error!(%stage, %file_id, class = class.as_str(), %reason, "dead-lettering");
            if tracks_status {
                self.record_failure(&msg, &reason, true).await;
            }
            self.dead_letter(&delivery, class, &reason).await;
            MessageHandled { stage, outcome: MessageOutcome::DeadLettered }.emit();
            return;
        }
    }

    /// One try at a message: admit it by the file's status, move the file through the stage,
    /// and return what to publish before the ack.
    async fn attempt(&self, msg: &StageMessage) -> Result<Vec<Outgoing>, Failure> {
        let (stage, file_id) = (self.stage(), msg.file_id());
        let Some(record) = self.handler.record(&self.deps, msg).await? else {
            return Ok(Vec::new());
        };
        let step = match self.spec.admit(msg.routing_key(), &record) {
            Admission::Refuse(why) => return Err(Failure::DeadLetter(why)),
            Admission::PassOn => {
                tracing::info!(%stage, %file_id, status = %record.status, "already past this stage; passing on its result");
                return Ok(self.announcing(&record));
            }
            Admission::Observe => self.handler.work(msg, &record).await?,
            Admission::Work => {
                let record = self.advance(file_id, self.spec.working, StatusUpdate::default()).await?;
                self.handler.work(msg, &record).await?
            }
        };
        match step {
            Step::Stay => Ok(Vec::new()),
            Step::Advance(to, update) => Ok(self.announcing(&self.advance(file_id, to, update).await?)),
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
            Ok(Advance::Moved(r)) => {
                if r.status.is_final() {
                    FileFinished { status: r.status }.emit();
                }
                Ok(r)
            }
            Ok(Advance::Refused(r)) => Ok(r),
            Err(e) => Err(Failure::storage(&format!("recording status {to}"), &e)),
        }
    }

    /// The message this stage publishes about where the file now stands, if any.
    fn announcing(&self, record: &StatusRecord) -> Vec<Outgoing> {
        StageMessage::announcing(record)
            .filter(|m| self.spec.publishes.contains(&m.routing_key()))
            .map(|m| m.outgoing(&self.deps.names))
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
    /// if `notify`, tells subscribers (`file.failed`). Best effort: called on the way to the
    /// DLQ, which keeps the message whatever happens here.
    async fn record_failure(&self, msg: &StageMessage, reason: &str, notify: bool) {
        let (stage, file_id) = (self.stage(), msg.file_id());
        let update = StatusUpdate { reason: Some(format!("{stage}: {reason}")), ..Default::default() };
        match self.deps.storage.statuses.advance(file_id, self.spec.failed, update, chrono::Utc::now()).await {
            Ok(Advance::Moved(record)) if !notify => {
                FileFinished { status: record.status }.emit();
                tracing::info!(%file_id, status = %record.status, "failure recorded")
            }
            Ok(Advance::Moved(record)) => {
                FileFinished { status: record.status }.emit();
                let note = Notification::of(&record, record.status).outgoing(NotificationKey::Failed, &self.deps.names);
                if let Err(e) = self.publisher.publish(&note).await {
                    tracing::warn!(%file_id, error = %e, "cannot publish the file.failed notification");
                }
            }
            Ok(Advance::Refused(record)) => {
                tracing::info!(%file_id, status = %record.status, "file already past this stage; status left as is")
            }
            Err(e) => {
                tracing::warn!(%file_id, error = %crate::error::Chain(&e), "cannot record the failure in the status table")
            }
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
