//! RabbitMQ plumbing: connecting, declaring the topology, publishing with confirms.
//!
//! Every service declares, idempotently, what it uses: the exchanges, the DLQ, the queue it
//! consumes and the queue its messages go to (so nothing published is ever dropped for want
//! of a queue). Queues are quorum queues with a delivery limit and a dead-letter exchange.

use crate::config::Settings;
use crate::messages::Stage;
use crate::names::Names;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::sync::Arc;

/// How long the DLQ keeps a message: 14 days, as the seed's SQS DLQ did.
pub const DLQ_MESSAGE_TTL_MS: i64 = 14 * 24 * 60 * 60 * 1000;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url}: {source} (is the broker running? set TXPIPE_AMQP_URL)")]
    Connect { url: String, source: lapin::Error },
    #[error("RabbitMQ error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused the message (negative publisher confirm)")]
    Nacked,
    #[error("no queue is bound to {exchange} for routing key {routing_key}")]
    Unroutable { exchange: String, routing_key: String },
}

/// A connection to the broker, shared by every part of a process.
#[derive(Clone)]
pub struct Broker {
    conn: Arc<Connection>,
    names: Names,
    delivery_limit: u32,
}

/// The URL with its password hidden, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn s(v: &str) -> ShortString {
    v.into()
}

fn long(v: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(v.into().into())
}

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// The same for every copy of the same message, so consumers can drop duplicates.
    pub message_id: String,
    /// Fail unless a queue receives it (pipeline messages); notifications may have no subscriber.
    pub mandatory: bool,
    pub headers: Vec<(String, String)>,
}

impl Broker {
    /// Connects to `settings.amqp_url`.
    pub async fn connect(settings: &Settings) -> Result<Self, AmqpError> {
        let conn = Connection::connect(&settings.amqp_url, ConnectionProperties::default())
            .await
            .map_err(|source| AmqpError::Connect { url: redact(&settings.amqp_url), source })?;
        Ok(Self { conn: Arc::new(conn), names: settings.names(), delivery_limit: settings.delivery_limit })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// A new channel on this connection.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        Ok(self.conn.create_channel().await?)
    }

    /// A channel in confirm mode, for publishing.
    pub async fn publisher(&self) -> Result<Publisher, AmqpError> {
        let channel = self.channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { channel })
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let _ = self.conn.close(200, s("bye")).await;
    }

    fn worker_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(s("x-queue-type"), long("quorum"));
        args.insert(s("x-dead-letter-exchange"), long(self.names.dead_letter_exchange()));
        args.insert(s("x-delivery-limit"), AMQPValue::LongLongInt(self.delivery_limit.into()));
        // at-least-once dead-lettering: a dead-lettered message leaves the queue only once the
        // DLQ has confirmed it (needs overflow reject-publish)
        args.insert(s("x-dead-letter-strategy"), long("at-least-once"));
        args.insert(s("x-overflow"), long("reject-publish"));
        args
    }

    /// Declares what `stage` uses: exchanges, DLQ, its own queue and the next stage's queue.
    pub async fn declare_for(&self, stage: Stage) -> Result<(), AmqpError> {
        self.declare(declared_queues(stage)).await
    }

    /// Declares the whole topology (the CLI's `topology up` and `txpipe up`).
    pub async fn declare_all(&self) -> Result<(), AmqpError> {
        self.declare(&[Stage::Validator, Stage::Transformer, Stage::Notifier]).await
    }

    async fn declare(&self, queues: &[Stage]) -> Result<(), AmqpError> {
        let ch = self.channel().await?;
        let n = &self.names;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for ex in [n.pipeline_exchange(), n.notifications_exchange(), n.dead_letter_exchange()] {
            ch.exchange_declare(s(&ex), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        }
        // a classic queue: `txpipe dlq list` browses it by getting and requeueing messages,
        // which a quorum queue would count toward a delivery limit
        let mut dlq_args = FieldTable::default();
        dlq_args.insert(s("x-queue-type"), long("classic"));
        dlq_args.insert(s("x-message-ttl"), AMQPValue::LongLongInt(DLQ_MESSAGE_TTL_MS));
        let qopts = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare(s(&n.dead_letter_queue()), qopts, dlq_args).await?;
        ch.queue_bind(
            s(&n.dead_letter_queue()),
            s(&n.dead_letter_exchange()),
            s("#"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for &stage in queues {
            ch.queue_declare(s(&n.queue(stage)), qopts, self.worker_queue_args()).await?;
            for key in stage.bindings() {
                ch.queue_bind(
                    s(&n.queue(stage)),
                    s(&n.pipeline_exchange()),
                    s(key),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
        }
        let _ = ch.close(200, s("declared")).await;
        Ok(())
    }

    /// Deletes every exchange and queue of the namespace (tests, `txpipe topology down`).
    pub async fn teardown(&self) -> Result<(), AmqpError> {
        let ch = self.channel().await?;
        let n = &self.names;
        for stage in [Stage::Validator, Stage::Transformer, Stage::Notifier] {
            ch.queue_delete(s(&n.queue(stage)), QueueDeleteOptions::default()).await?;
        }
        ch.queue_delete(s(&n.dead_letter_queue()), QueueDeleteOptions::default()).await?;
        for ex in [n.pipeline_exchange(), n.notifications_exchange(), n.dead_letter_exchange()] {
            ch.exchange_delete(s(&ex), ExchangeDeleteOptions::default()).await?;
        }
        let _ = ch.close(200, s("torn down")).await;
        Ok(())
    }
}

/// The worker queues a service declares: its input and the queue its output goes to, so a
/// message published before the next stage ever started waits for it.
pub fn declared_queues(stage: Stage) -> &'static [Stage] {
    match stage {
        Stage::Gateway => &[Stage::Validator],
        Stage::Validator => &[Stage::Validator, Stage::Transformer],
        Stage::Transformer => &[Stage::Transformer, Stage::Notifier],
        Stage::Notifier => &[Stage::Notifier],
    }
}

/// A confirm-mode channel: `publish` returns only once the broker has taken the message.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Publishes persistently and waits for the broker's confirm.
    pub async fn publish(&self, msg: &Outgoing) -> Result<(), AmqpError> {
        let mut headers = FieldTable::default();
        for (k, v) in &msg.headers {
            headers.insert(s(k), long(v.clone()));
        }
        let props = BasicProperties::default()
            .with_content_type(s("application/json"))
            .with_delivery_mode(2)
            .with_message_id(s(&msg.message_id))
            .with_app_id(s("txpipe"))
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        let confirm = self
            .channel
            .basic_publish(
                s(&msg.exchange),
                s(&msg.routing_key),
                BasicPublishOptions { mandatory: msg.mandatory, ..Default::default() },
                &msg.body,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => {
                Err(AmqpError::Unroutable { exchange: msg.exchange.clone(), routing_key: msg.routing_key.clone() })
            }
            Confirmation::Nack(_) => Err(AmqpError::Nacked),
        }
    }

    /// True while the channel can publish.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_hidden() {
        assert_eq!(super::redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(super::redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
