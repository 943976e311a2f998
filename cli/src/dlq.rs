//! The DLQ tooling: list, show, replay and purge `{ns}.dlq`, and re-drive a failed file.
//!
//! Browsing gets every message without acking it and then gives them all back, so `list`
//! and `show` change nothing (the DLQ is a classic queue, where that costs no delivery count).
//! `replay` publishes a message to the exchange and routing key it was dead-lettered from,
//! waits for the confirm, and only then removes it from the DLQ.

use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::Serialize;
use std::collections::BTreeMap;
use txpipe_common::amqp::{AmqpError, Broker};
use txpipe_common::messages::{FileEvent, FileId, Stage, FILE_PROCESSED, FILE_UPLOADED, FILE_VALIDATED};
use txpipe_common::status::FileStatus;
use txpipe_common::Deps;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("RabbitMQ error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Refused(String),
}

/// One dead-lettered message, as `dlq list` and `dlq show` describe it.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// Position in the DLQ, from 1 (as `dlq show N` takes it).
    pub index: usize,
    pub stage: Option<String>,
    /// `malformed`, `permanent`, `retries_exhausted` (txpipe's own) or RabbitMQ's reason
    /// (`delivery_limit`, `rejected`, `expired`).
    pub class: String,
    pub reason: String,
    pub file_id: Option<FileId>,
    pub dead_lettered_at: Option<String>,
    /// Times RabbitMQ dead-lettered it (1 for txpipe's own dead letters).
    pub count: u64,
    /// Where a replay sends it.
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Which dead letters a command applies to; every given field must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub stage: Option<String>,
    pub file_id: Option<FileId>,
    pub reason: Option<String>,
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.stage.as_ref().is_none_or(|s| d.stage.as_deref() == Some(s.as_str()))
            && self.file_id.is_none_or(|f| d.file_id == Some(f))
            && self.reason.as_ref().is_none_or(|r| d.class.contains(r.as_str()) || d.reason.contains(r.as_str()))
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::Timestamp(t) => {
            Some(chrono::DateTime::from_timestamp(*t as i64, 0).map(|d| d.to_rfc3339()).unwrap_or_default())
        }
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        _ => None,
    }
}

fn describe(index: usize, d: &Delivery, ns: &str) -> DeadLetter {
    let mut headers = BTreeMap::new();
    let mut death: Option<&FieldTable> = None;
    if let Some(h) = d.properties.headers() {
        for (k, v) in h.inner() {
            if let Some(t) = text(v) {
                headers.insert(k.to_string(), t);
            }
            if k.as_str() == "x-death" {
                if let AMQPValue::FieldArray(a) = v {
                    if let Some(AMQPValue::FieldTable(t)) = a.as_slice().first() {
                        death = Some(t);
                    }
                }
            }
        }
    }
    let field = |t: &FieldTable, k: &str| t.inner().get(k).and_then(text);
    let from_queue = death.and_then(|t| field(t, "queue"));
    let stage = headers.get("x-txpipe-stage").cloned().or_else(|| {
        from_queue
            .as_deref()
            .and_then(|q| q.strip_prefix(&format!("{ns}.")))
            .map(str::to_owned)
            .or_else(|| Stage::consuming(d.routing_key.as_str()).map(|s| s.as_str().to_owned()))
    });
    let (class, reason) = match headers.get("x-txpipe-error-class") {
        Some(c) => (c.clone(), headers.get("x-txpipe-reason").cloned().unwrap_or_default()),
        None => {
            let r = headers.get("x-first-death-reason").cloned().unwrap_or_else(|| "unknown".into());
            let why = match r.as_str() {
                "delivery_limit" => "delivered more times than the queue's delivery limit without being settled (it kept crashing its worker?)",
                "rejected" => "rejected by a consumer without requeue",
                "expired" => "its TTL expired",
                "maxlen" => "the queue was full",
                _ => "dead-lettered by RabbitMQ",
            };
            (r, why.to_owned())
        }
    };
    let count = death
        .and_then(|t| t.inner().get("count"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            _ => None,
        })
        .unwrap_or(1);
    let exchange = headers
        .get("x-txpipe-original-exchange")
        .or_else(|| headers.get("x-first-death-exchange"))
        .cloned()
        .unwrap_or_else(|| format!("{ns}.pipeline"));
    let routing_key =
        headers.get("x-txpipe-original-routing-key").cloned().unwrap_or_else(|| d.routing_key.to_string());
    let dead_lettered_at =
        headers.get("x-txpipe-dead-lettered-at").cloned().or_else(|| death.and_then(|t| field(t, "time")));
    DeadLetter {
        index,
        stage,
        class,
        reason,
        file_id: FileEvent::from_body(&d.data).ok().map(|e| e.file_id),
        dead_lettered_at,
        count,
        exchange,
        routing_key,
        message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
        headers,
        body: String::from_utf8_lossy(&d.data).into_owned(),
    }
}

/// Every message in the DLQ, held unacked on `channel` until given back or acked.
struct Held {
    channel: Channel,
    items: Vec<(DeadLetter, Delivery)>,
}

async fn take_all(broker: &Broker) -> Result<Held, DlqError> {
    let names = broker.names();
    let channel = broker.channel().await?;
    let q = channel
        .queue_declare(
            names.dead_letter_queue().as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let mut items = Vec::new();
    for i in 0..q.message_count() as usize {
        match channel.basic_get(names.dead_letter_queue().as_str().into(), BasicGetOptions { no_ack: false }).await? {
            Some(m) => items.push((describe(i + 1, &m.delivery, names.namespace()), m.delivery)),
            None => break,
        }
    }
    Ok(Held { channel, items })
}

impl Held {
    async fn give_back(&self, delivery: &Delivery) -> Result<(), DlqError> {
        self.channel.basic_nack(delivery.delivery_tag, BasicNackOptions { multiple: false, requeue: true }).await?;
        Ok(())
    }

    async fn close(self) {
        // closing the channel gives back anything still held
        let _ = self.channel.close(200, "done".into()).await;
    }
}

/// The dead letters that match `filter`; the DLQ is left as it was.
pub async fn list(broker: &Broker, filter: &Filter) -> Result<Vec<DeadLetter>, DlqError> {
    let held = take_all(broker).await?;
    let out = held.items.iter().filter(|(d, _)| filter.matches(d)).map(|(d, _)| d.clone()).collect();
    for (_, delivery) in &held.items {
        held.give_back(delivery).await?;
    }
    held.close().await;
    Ok(out)
}

/// Sends the matching dead letters back to where they came from and removes them from the
/// DLQ (each only after its publish is confirmed); with `dry_run`, only says which.
pub async fn replay(broker: &Broker, filter: &Filter, dry_run: bool) -> Result<Vec<DeadLetter>, DlqError> {
    let confirm = broker.channel().await?;
    confirm.confirm_select(Default::default()).await?;
    let held = take_all(broker).await?;
    let mut replayed = Vec::new();
    let mut failure = None;
    for (d, delivery) in &held.items {
        if dry_run || !filter.matches(d) || failure.is_some() {
            if filter.matches(d) && failure.is_none() {
                replayed.push(d.clone());
            }
            held.give_back(delivery).await?;
            continue;
        }
        // drop the dead-letter bookkeeping; keep the id so consumers can still deduplicate
        let mut headers = FieldTable::default();
        if let Some(h) = delivery.properties.headers() {
            for (k, v) in h.inner() {
                if !(k.as_str().starts_with("x-death")
                    || k.as_str().starts_with("x-first-death")
                    || k.as_str().starts_with("x-last-death")
                    || k.as_str().starts_with("x-txpipe-"))
                {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        let props = delivery.properties.clone().with_headers(headers);
        let sent = publish(&confirm, &d.exchange, &d.routing_key, &delivery.data, props).await;
        match sent {
            Ok(()) => {
                held.channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default()).await?;
                replayed.push(d.clone());
            }
            Err(e) => {
                held.give_back(delivery).await?;
                failure = Some(e);
            }
        }
    }
    held.close().await;
    let _ = confirm.close(200, "done".into()).await;
    match failure {
        Some(e) => Err(DlqError::Refused(format!(
            "replayed {} message(s), then a publish failed and the rest were left in the DLQ: {e}",
            replayed.len()
        ))),
        None => Ok(replayed),
    }
}

/// Publishes on a confirm-mode channel and waits for the broker to take the message.
async fn publish(
    confirm: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), DlqError> {
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    match confirm.basic_publish(exchange.into(), key.into(), options, body, props).await?.await? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(DlqError::Refused(format!("no queue is bound to {exchange} for {key}"))),
        Confirmation::Nack(_) => Err(DlqError::Refused("RabbitMQ refused the message".into())),
    }
}

/// Removes every message from the DLQ; returns how many.
pub async fn purge(broker: &Broker) -> Result<u32, DlqError> {
    let channel = broker.channel().await?;
    let n =
        channel.queue_purge(broker.names().dead_letter_queue().as_str().into(), QueuePurgeOptions::default()).await?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(n)
}

/// The DLQ's message count.
pub async fn count(broker: &Broker) -> Result<u32, DlqError> {
    let channel = broker.channel().await?;
    let q = channel
        .queue_declare(
            broker.names().dead_letter_queue().as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "counted".into()).await;
    Ok(q.message_count())
}

/// Re-drives a failed file from its stored object: publishes the message its failed stage
/// consumes. Returns the routing key published.
pub async fn retry(deps: &Deps, file_id: FileId) -> Result<&'static str, DlqError> {
    let record = deps
        .storage
        .statuses
        .get(file_id)
        .await
        .map_err(|e| DlqError::Refused(e.to_string()))?
        .ok_or_else(|| DlqError::Refused(format!("no file with id {file_id}")))?;
    let key = match record.status {
        FileStatus::ValidationFailed if record.error_count.is_some() => {
            return Err(DlqError::Refused(format!(
                "file {file_id} was rejected for its contents ({} problem(s)): upload a corrected file instead",
                record.error_count.unwrap_or(0)
            )))
        }
        FileStatus::ValidationFailed => FILE_UPLOADED,
        FileStatus::ProcessingFailed => FILE_VALIDATED,
        FileStatus::NotificationFailed => FILE_PROCESSED,
        other => {
            return Err(DlqError::Refused(format!("file {file_id} is {other}; only a failed file can be retried")))
        }
    };
    let mut event = FileEvent::new(file_id, record.object_key.clone());
    event.row_count = record.row_count;
    event.records_processed = record.records_processed;
    deps.publisher.publish(&deps.stage_message(key, &event)).await?;
    Ok(key)
}
