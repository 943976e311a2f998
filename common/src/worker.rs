//! The consume → handle → publish → ack loop, written once for every worker.
//!
//! A worker is a [`Handler`]: given a parsed message it returns an [`Outcome`]. The loop
//! parses bodies at the edge (a body that does not parse is dead-lettered at once), retries
//! transient failures with backoff, publishes the handler's messages with confirms, and acks
//! only after that, so a crash at any point means a redelivery, never a loss.

use crate::amqp::{AmqpError, Broker, Outgoing, Publisher};
use crate::config::Settings;
use crate::deps::Deps;
use crate::messages::{FileEvent, Stage};
use crate::metrics::{DeadLettered, InternalEvent, MessageHandled, MessageOutcome, MessageTimed};
use async_trait::async_trait;
use backon::BackoffBuilder;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// How long in-flight messages may run on after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A message as a handler sees it: already parsed.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub routing_key: String,
    pub event: FileEvent,
    /// The broker says this message was delivered before.
    pub redelivered: bool,
}

/// Why a message is dead-lettered, recorded in its `x-txpipe-error-class` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The body is not a message txpipe understands.
    Malformed,
    /// Processing can never succeed (e.g. the object is gone).
    Permanent,
    /// A transient fault outlasted every retry.
    RetriesExhausted,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Malformed => "malformed",
            ErrorClass::Permanent => "permanent",
            ErrorClass::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// What the loop should do with a message.
#[derive(Debug)]
pub enum Outcome {
    /// Done: publish these (each confirmed), then ack.
    Done(Vec<Outgoing>),
    /// Will never succeed: dead-letter it now.
    DeadLetter(String),
    /// Failed for now: try again after a backoff, dead-letter when retries run out.
    Retry(String),
}

/// One worker stage's logic.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    fn stage(&self) -> Stage;
    async fn handle(&self, msg: &Incoming) -> Outcome;
    /// Whether a failure of this message is the file's failure in this stage. If so, the loop
    /// records the stage's `*_failed` status before dead-lettering the message (and publishes
    /// `file.failed`), and on the last delivery RabbitMQ allows it (its delivery limit) records
    /// `delivery_limit` first, since a crash then leaves no other chance. Best effort.
    fn tracks_status(&self, _msg: &Incoming) -> bool {
        true
    }
}

struct Loop {
    deps: Deps,
    handler: Arc<dyn Handler>,
    publisher: Publisher,
    settings: Arc<Settings>,
    dlx: String,
}

/// Consumes the stage's queue until `shutdown` resolves, then lets in-flight messages finish
/// (up to [`SHUTDOWN_GRACE`]). When the broker connection drops, it waits for the
/// [`Broker`] to reconnect, then declares its queues, sets QoS and consumes again (messages in
/// flight on the old connection are redelivered by the broker). Returns an error only when
/// reconnecting was given up.
pub async fn run(deps: &Deps, handler: Arc<dyn Handler>, shutdown: impl Future<Output = ()>) -> Result<(), AmqpError> {
    let stage = handler.stage();
    let (broker, settings) = (&deps.broker, deps.settings.clone());
    let ctx = Arc::new(Loop {
        deps: deps.clone(),
        handler,
        publisher: broker.publisher().await?,
        settings: settings.clone(),
        dlx: broker.names().dead_letter_exchange(),
    });
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let result = loop {
        let subscribed = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            s = subscribe(broker, stage, &settings) => s,
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
    settings: &Settings,
) -> Result<(lapin::Channel, String, lapin::Consumer), AmqpError> {
    broker.declare_for(stage).await?;
    let queue = broker.names().queue(stage);
    let channel = broker.channel().await?;
    channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
    let tag = format!("{}-{}", stage, uuid::Uuid::new_v4().simple());
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(%stage, %queue, prefetch = settings.prefetch, "consuming");
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

fn header_u64(d: &Delivery, name: &str) -> Option<u64> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        _ => None,
    }
}

fn header_text(d: &Delivery, name: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(v) => Some(v.to_string()),
        AMQPValue::ShortString(v) => Some(v.to_string()),
        _ => None,
    }
}

impl Loop {
    /// Handles one delivery in the trace it carries (or a new one).
    async fn process(&self, delivery: Delivery) {
        let trace = header_text(&delivery, crate::trace::HEADER)
            .and_then(|v| crate::trace::TraceContext::parse(&v))
            .unwrap_or_else(crate::trace::TraceContext::start);
        trace.scope(self.handler.stage().as_str(), self.process_traced(delivery)).await
    }

    async fn process_traced(&self, delivery: Delivery) {
        let stage = self.handler.stage();
        let routing_key = delivery.routing_key.to_string();
        let event = match FileEvent::from_body(&delivery.data) {
            Ok(e) => e,
            Err(reason) => {
                tracing::warn!(%stage, %routing_key, %reason, "dead-lettering a message that cannot be parsed");
                self.dead_letter(&delivery, ErrorClass::Malformed, &reason).await;
                MessageHandled { stage, outcome: MessageOutcome::Malformed }.emit();
                return;
            }
        };
        let msg = Incoming { routing_key, event, redelivered: delivery.redelivered };
        let file_id = msg.event.file_id;
        if let Some(n) = header_u64(&delivery, "x-delivery-count") {
            tracing::info!(%stage, %file_id, deliveries = n + 1, "redelivered message");
            if n >= u64::from(self.settings.delivery_limit) {
                let reason = format!(
                    "delivery_limit: the message was delivered {} times without being settled (did it crash the worker?); \
                     if this last attempt fails too, RabbitMQ dead-letters it",
                    n + 1
                );
                if self.handler.tracks_status(&msg) {
                    self.deps.record_failure(stage, file_id, &reason, false).await;
                }
            }
        }
        let mut backoff = self.settings.retry_policy().build();
        let started = std::time::Instant::now();
        let _timer = Timer(stage, started);
        loop {
            let handled = AssertUnwindSafe(self.handler.handle(&msg)).catch_unwind().await;
            let Ok(outcome) = handled else {
                // a crash in the handler: give the message back (its delivery count grows, so a
                // message that always crashes ends in the DLQ at the delivery limit)
                tracing::error!(%stage, %file_id, "the handler panicked; returning the message to its queue");
                MessageHandled { stage, outcome: MessageOutcome::Panicked }.emit();
                if let Err(e) = settle(delivery.nack(BasicNackOptions { requeue: true, ..Default::default() })).await {
                    tracing::warn!(%stage, %file_id, error = %e, "nack failed; the message will be redelivered");
                }
                return;
            };
            let (class, reason) = match outcome {
                Outcome::Done(out) => match self.publish_all(&out).await {
                    Ok(()) => {
                        if let Err(e) = settle(delivery.ack(BasicAckOptions::default())).await {
                            tracing::warn!(%stage, %file_id, error = %e, "ack failed; the message will be redelivered");
                        }
                        MessageHandled { stage, outcome: MessageOutcome::Done }.emit();
                        return;
                    }
                    Err(e) => (ErrorClass::RetriesExhausted, format!("publishing the next message failed: {e}")),
                },
                Outcome::DeadLetter(reason) => (ErrorClass::Permanent, reason),
                Outcome::Retry(reason) => (ErrorClass::RetriesExhausted, reason),
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
            if self.handler.tracks_status(&msg) {
                self.deps.mark_failed(stage, file_id, &reason).await;
            }
            self.dead_letter(&delivery, class, &reason).await;
            MessageHandled { stage, outcome: MessageOutcome::DeadLettered }.emit();
            return;
        }
    }

    async fn publish_all(&self, out: &[Outgoing]) -> Result<(), AmqpError> {
        for m in out {
            self.publisher.publish(m).await?;
        }
        Ok(())
    }

    /// Copies the message to the dead-letter exchange with headers saying why, then acks it.
    /// If that copy cannot be made, rejects it so RabbitMQ dead-letters it itself.
    async fn dead_letter(&self, delivery: &Delivery, class: ErrorClass, reason: &str) {
        let stage = self.handler.stage();
        DeadLettered { stage, class }.emit();
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_else(|| format!("dead-letter:{}", uuid::Uuid::new_v4()));
        let copy = Outgoing {
            exchange: self.dlx.clone(),
            routing_key: delivery.routing_key.to_string(),
            body: delivery.data.clone(),
            message_id,
            mandatory: true,
            headers: vec![
                ("x-txpipe-stage".into(), stage.as_str().into()),
                ("x-txpipe-error-class".into(), class.as_str().into()),
                ("x-txpipe-reason".into(), reason.chars().take(1000).collect()),
                ("x-txpipe-original-exchange".into(), delivery.exchange.to_string()),
                ("x-txpipe-original-routing-key".into(), delivery.routing_key.to_string()),
                ("x-txpipe-dead-lettered-at".into(), chrono::Utc::now().to_rfc3339()),
            ],
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

/// The outcome for a storage failure: retry what may pass, dead-letter what cannot.
pub fn storage_failure(what: &str, e: &crate::storage::StorageError) -> Outcome {
    let reason = format!("{what}: {e}");
    if e.is_transient() {
        Outcome::Retry(reason)
    } else {
        Outcome::DeadLetter(reason)
    }
}

/// The file's status record, or the outcome for a message about a file that cannot be read:
/// retried if storage is unavailable, dead-lettered if the file is unknown.
pub async fn status_of(deps: &Deps, file_id: crate::messages::FileId) -> Result<crate::status::StatusRecord, Outcome> {
    match deps.storage.statuses.get(file_id).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(Outcome::DeadLetter(format!("no status record for file {file_id}"))),
        Err(e) => Err(storage_failure("reading the file's status", &e)),
    }
}

/// The outcome for an I/O error while streaming an object on the blocking pool.
pub fn read_failure(what: &str, e: &std::io::Error) -> Outcome {
    let reason = format!("{what}: {e}");
    if e.kind() == std::io::ErrorKind::NotFound {
        Outcome::DeadLetter(reason)
    } else {
        Outcome::Retry(reason)
    }
}
