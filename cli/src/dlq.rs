//! The DLQ tooling: list, show, replay and purge `{ns}.dlq`, and re-drive a failed file.
//!
//! Browsing gets every message without acking it and then gives them all back, so `list`
//! and `show` change nothing (the DLQ is a classic queue, where that costs no delivery count).
//! `replay` publishes a message to the exchange and routing key it was dead-lettered from,
//! waits for the confirm, and only then removes it from the DLQ.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use serde::Serialize;
use std::collections::BTreeMap;
use txpipe_common::amqp::{AmqpError, Broker};
use txpipe_common::dead_letter::DeadLetterInfo;
use txpipe_common::headers::Headers;
use txpipe_common::messages::{file_id_of, Outgoing, StageMessage};
use txpipe_common::stage::{RoutingKey, Stage};
use txpipe_common::{Deps, FileId, Names};

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

fn describe(index: usize, d: &Delivery, names: &Names) -> DeadLetter {
    let h = Headers::of(d);
    let headers: BTreeMap<String, String> = h.texts().collect();
    let death = h.last_death();
    let routing_key = d.routing_key.to_string();
    let (stage, class, reason, exchange, routing_key, dead_lettered_at) = match DeadLetterInfo::decode(&h) {
        // txpipe's own dead letter says everything itself
        Some(info) => (
            Some(info.stage),
            info.class.as_str().to_owned(),
            info.reason,
            info.original_exchange,
            info.original_routing_key,
            Some(info.dead_lettered_at.to_rfc3339()),
        ),
        // one RabbitMQ dead-lettered (delivery limit, a reject): its x-death headers tell
        None => {
            let r = h.text("x-first-death-reason").unwrap_or_else(|| "unknown".into());
            let why = match r.as_str() {
                "delivery_limit" => "delivered more times than the queue's delivery limit without being settled (it kept crashing its worker?)",
                "rejected" => "rejected by a consumer without requeue",
                "expired" => "its TTL expired",
                "maxlen" => "the queue was full",
                _ => "dead-lettered by RabbitMQ",
            };
            let stage = death
                .and_then(|t| t.text("queue"))
                .and_then(|q| names.stage_of_queue(&q))
                .or_else(|| RoutingKey::parse(&routing_key).map(RoutingKey::consumer));
            let exchange = h.text("x-first-death-exchange").unwrap_or_else(|| names.pipeline_exchange());
            (stage, r, why.to_owned(), exchange, routing_key, death.and_then(|t| t.text("time")))
        }
    };
    DeadLetter {
        index,
        stage: stage.map(|s| s.as_str().to_owned()),
        class,
        reason,
        file_id: file_id_of(&d.data),
        dead_lettered_at,
        count: death.and_then(|t| t.u64("count")).unwrap_or(1),
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
            Some(m) => items.push((describe(i + 1, &m.delivery, names), m.delivery)),
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
    let publisher = broker.publisher().await?;
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
        match publisher.publish(&replay_of(d, delivery)).await {
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
    match failure {
        Some(e) => Err(DlqError::Refused(format!(
            "replayed {} message(s), then a publish failed and the rest were left in the DLQ: {e}",
            replayed.len()
        ))),
        None => Ok(replayed),
    }
}

/// The message a replay publishes: the dead letter as it was first sent, without the
/// dead-letter bookkeeping, and with its id, so consumers can still deduplicate.
fn replay_of(d: &DeadLetter, delivery: &Delivery) -> Outgoing {
    Outgoing {
        exchange: d.exchange.clone(),
        routing_key: d.routing_key.clone(),
        body: delivery.data.clone(),
        message_id: d.message_id.clone().unwrap_or_else(|| match StageMessage::parse(&d.routing_key, &delivery.data) {
            Ok(m) => m.message_id(),
            Err(_) => format!("replay:{}:{}", d.routing_key, d.index),
        }),
        mandatory: true,
        headers: Headers::of(delivery).texts().filter(|(k, _)| !DeadLetterInfo::is_bookkeeping(k)).collect(),
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
pub async fn retry(deps: &Deps, file_id: FileId) -> Result<RoutingKey, DlqError> {
    let record = deps
        .storage
        .statuses
        .get(file_id)
        .await
        .map_err(|e| DlqError::Refused(e.to_string()))?
        .ok_or_else(|| DlqError::Refused(format!("no file with id {file_id}")))?;
    if record.is_rejected() {
        return Err(DlqError::Refused(format!(
            "file {file_id} was rejected for its contents ({} problem(s)): upload a corrected file instead",
            record.error_count.unwrap_or(0)
        )));
    }
    let Some(stage) = Stage::failed_in(record.status) else {
        return Err(DlqError::Refused(format!(
            "file {file_id} is {}; only a failed file can be retried",
            record.status
        )));
    };
    let msg = StageMessage::from_record(stage.spec().advances_on, &record);
    deps.publisher.publish(&msg.outgoing(&deps.names)).await?;
    Ok(msg.routing_key())
}
