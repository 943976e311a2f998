//! RabbitMQ plumbing: connecting, declaring the topology, publishing with confirms.
//!
//! Every service declares, idempotently, what it uses: the exchanges, the DLQ, the queue it
//! consumes and the queue its messages go to (so nothing published is ever dropped for want
//! of a queue). Queues are quorum queues with a delivery limit and a dead-letter exchange; the
//! DLQ keeps what it holds until someone removes it (no expiry).

use crate::config::Settings;
use crate::messages::Outgoing;
use crate::metrics::{BrokerConnected, BrokerLost, BrokerReconnected, InternalEvent};
use crate::names::Names;
use crate::stage::{Service, Stage};
use backon::BackoffBuilder;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a publish waits for the broker's confirm (and a channel for the broker's answer).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// RabbitMQ's own `x-delivery-limit` on the stage queues, for txpipe's `TXPIPE_DELIVERY_LIMIT`:
/// only a safety net. txpipe counts crashes itself (in the file's status record, or a header
/// on a message that moves no file), because from RabbitMQ 4.3 a requeueing nack no longer
/// counts, and because a worker that dies returns every message it had prefetched, each of
/// which the broker counts, though only one of them killed it.
pub fn broker_delivery_limit(limit: u32) -> u32 {
    limit.saturating_mul(4).max(20)
}

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
    #[error("not connected to RabbitMQ (reconnecting)")]
    Disconnected,
    #[error("RabbitMQ did not confirm the message in time")]
    ConfirmTimeout,
    #[error("queue {0} does not exist and this service's RabbitMQ user may not create it: run `txpipe provision` (as a user allowed to configure every queue of the namespace) first")]
    NotProvisioned(String),
    #[error("could not reconnect to RabbitMQ within {0:?} (TXPIPE_RECONNECT_TIMEOUT_MS)")]
    GaveUp(Duration),
}

/// A connection to the broker that heals itself, shared by every part of a process.
///
/// A supervisor task watches the connection; when it drops, it reconnects with backoff (lapin
/// does not recover topology or QoS, so consumers subscribe again themselves when
/// [`Broker::wait_up`] says the link is back). Past `TXPIPE_RECONNECT_TIMEOUT_MS` without a
/// connection it gives up, and every service stops with an error so a supervisor restarts it.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every address of the broker (the nodes of a cluster), tried in turn.
    urls: Vec<String>,
    /// The one the current connection went to.
    current: std::sync::atomic::AtomicUsize,
    names: Names,
    delivery_limit: u32,
    reconnect_timeout: Duration,
    conn: std::sync::RwLock<Arc<Connection>>,
    link: tokio::sync::watch::Sender<Link>,
    closing: AtomicBool,
}

/// The state of the link to the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Connected; the number counts connections made (1 for the first).
    Up(u64),
    /// Lost; reconnecting.
    Down,
    /// Lost for longer than the reconnect timeout: the process should stop.
    GaveUp,
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

impl Broker {
    /// Connects to the first of `settings.amqp_urls()` that answers and starts watching the
    /// connection.
    pub async fn connect(settings: &Settings) -> Result<Self, AmqpError> {
        let urls = settings.amqp_urls();
        let (conn, current) = connect_any(&urls, 0).await.map_err(|source| AmqpError::Connect {
            url: urls.iter().map(|u| redact(u)).collect::<Vec<_>>().join(", "),
            source,
        })?;
        let (link, _) = tokio::sync::watch::channel(Link::Up(1));
        let inner = Arc::new(Inner {
            urls,
            current: std::sync::atomic::AtomicUsize::new(current),
            names: settings.names(),
            delivery_limit: settings.delivery_limit,
            reconnect_timeout: Duration::from_millis(settings.reconnect_timeout_ms),
            conn: std::sync::RwLock::new(Arc::new(conn)),
            link,
            closing: AtomicBool::new(false),
        });
        BrokerConnected.emit();
        tokio::spawn(supervise(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    fn current(&self) -> Arc<Connection> {
        self.inner.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.current().status().connected()
    }

    /// The state of the link now.
    pub fn link(&self) -> Link {
        *self.inner.link.borrow()
    }

    /// Waits until the link is up (returning its connection count), or fails once the
    /// supervisor has given up reconnecting.
    pub async fn wait_up(&self) -> Result<u64, AmqpError> {
        let mut rx = self.inner.link.subscribe();
        loop {
            match *rx.borrow_and_update() {
                Link::Up(n) => return Ok(n),
                Link::GaveUp => return Err(AmqpError::GaveUp(self.inner.reconnect_timeout)),
                Link::Down => {}
            }
            if rx.changed().await.is_err() {
                return Err(AmqpError::GaveUp(self.inner.reconnect_timeout));
            }
        }
    }

    /// Resolves once reconnecting has been given up.
    pub async fn gave_up(&self) {
        let mut rx = self.inner.link.subscribe();
        let _ = rx.wait_for(|l| *l == Link::GaveUp).await;
    }

    /// A new channel on the current connection; fails at once while disconnected.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let conn = self.current();
        if !conn.status().connected() {
            return Err(AmqpError::Disconnected);
        }
        // a connection that is dying may never answer: do not wait for it forever
        match tokio::time::timeout(CONFIRM_TIMEOUT, conn.create_channel()).await {
            Ok(channel) => Ok(channel?),
            Err(_) => Err(AmqpError::Disconnected),
        }
    }

    /// A publisher with its own confirm-mode channel (renewed after a connection loss).
    pub async fn publisher(&self) -> Result<Publisher, AmqpError> {
        let publisher = Publisher { broker: self.clone(), channel: Arc::new(tokio::sync::Mutex::new(None)) };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// Closes the connection politely and stops reconnecting.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let _ = self.current().close(200, s("bye")).await;
    }

    fn worker_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(s("x-queue-type"), long("quorum"));
        args.insert(s("x-dead-letter-exchange"), long(self.inner.names.dead_letter_exchange()));
        args.insert(
            s("x-delivery-limit"),
            AMQPValue::LongLongInt(broker_delivery_limit(self.inner.delivery_limit).into()),
        );
        // at-least-once dead-lettering: a dead-lettered message leaves the queue only once the
        // DLQ has confirmed it (needs overflow reject-publish)
        args.insert(s("x-dead-letter-strategy"), long("at-least-once"));
        args.insert(s("x-overflow"), long("reject-publish"));
        args
    }

    /// Declares what `service` uses: exchanges, DLQ, its own queue and the queues its
    /// messages go to.
    pub async fn declare_for(&self, service: Service) -> Result<(), AmqpError> {
        self.declare(&service.declared_queues()).await
    }

    /// Declares the whole topology (the CLI's `topology up` and `txpipe up`).
    pub async fn declare_all(&self) -> Result<(), AmqpError> {
        self.declare(&Stage::ALL).await
    }

    async fn declare(&self, queues: &[Stage]) -> Result<(), AmqpError> {
        let ch = self.channel().await?;
        let n = &self.inner.names;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for ex in [n.pipeline_exchange(), n.notifications_exchange(), n.dead_letter_exchange()] {
            ch.exchange_declare(s(&ex), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        }
        // a classic queue: `txpipe dlq list` browses it by getting and requeueing messages,
        // which a quorum queue would count toward a delivery limit. No message TTL: a dead
        // letter stays until someone replays or purges it (the DLQ-growth alert says it is there)
        let mut dlq_args = FieldTable::default();
        dlq_args.insert(s("x-queue-type"), long("classic"));
        let qopts = QueueDeclareOptions { durable: true, ..Default::default() };
        let mut ch = ch;
        let declared = match ch.queue_declare(s(&n.dead_letter_queue()), qopts, dlq_args).await {
            Ok(_) => Ok(()),
            // declared by an older txpipe, with a 14-day x-message-ttl: arguments cannot change on
            // an existing queue, so keep it (refusing to start would stop the pipeline) and say
            // how to migrate. The refusal closed the channel: go on with a new one
            Err(e) if is_reply(&e, 406) => {
                tracing::warn!(queue = %n.dead_letter_queue(), error = %e,
                    "the DLQ exists with other arguments (an older txpipe gave it a 14-day x-message-ttl, so older dead letters \
                     expire unseen); keeping it as it is: see docs/operations.md, \"The DLQ keeps everything\", to migrate");
                ch = self.channel().await?;
                Ok(())
            }
            Err(e) => Err(e),
        };
        match declared {
            Ok(()) => {
                ch.queue_bind(
                    s(&n.dead_letter_queue()),
                    s(&n.dead_letter_exchange()),
                    s("#"),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?
            }
            // in a cluster, a classic queue lives on one node: while that node is down the
            // queue exists but cannot be reached (404). The stage queues are replicated, so the
            // pipeline goes on; what fails meanwhile waits in its queue for its retries
            Err(e) if is_reply(&e, 404) => {
                tracing::warn!(queue = %n.dead_letter_queue(), error = %e, "the DLQ's node is down; carrying on without it");
                ch = self.channel().await?;
            }
            Err(e) => return Err(e.into()),
        }
        for &stage in queues {
            let queue = n.queue(stage);
            match ch.queue_declare(s(&queue), qopts, self.worker_queue_args()).await {
                Ok(_) => {}
                Err(e) if is_reply(&e, 406) => {
                    // made by an older txpipe (x-delivery-limit was TXPIPE_DELIVERY_LIMIT itself) or
                    // under another TXPIPE_DELIVERY_LIMIT: the queue keeps its arguments, and txpipe's
                    // own crash count still applies; the broker's limit is only a safety net
                    tracing::warn!(%queue, error = %e,
                        "the queue exists with other arguments; keeping them (see docs/operations.md, \"Upgrading\")");
                    ch = self.channel().await?;
                }
                Err(e) if is_reply(&e, 403) => {
                    // least privilege: declaring a queue with a dead-letter exchange needs read
                    // on it (the right to consume), which a service has only on its own queue;
                    // the next stage's queue must then have been created by `txpipe provision`
                    // (with its bindings). The refusal closed the channel: check on a new one.
                    ch = self.channel().await?;
                    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                    if ch.queue_declare(s(&queue), passive, FieldTable::default()).await.is_err() {
                        return Err(AmqpError::NotProvisioned(queue));
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            for key in stage.spec().inputs() {
                ch.queue_bind(
                    s(&n.queue(stage)),
                    s(&n.pipeline_exchange()),
                    s(key.as_str()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
        }
        let _ = ch.close(200, s("declared")).await;
        Ok(())
    }

    /// Subscribes this process alone to `bindings` (exchange, routing key): declares `queue`
    /// exclusive and auto-deleted (a classic queue, gone with the connection, so a process that
    /// dies leaves nothing behind), capped at [`SUBSCRIPTION_MAX_LENGTH`] messages (the oldest
    /// dropped first), binds it and consumes it without acks. For signals a process can afford
    /// to lose (it reads the state they point at anyway), never for work. Bounded in time.
    pub async fn subscribe_own(&self, queue: &str, bindings: &[(String, &str)]) -> Result<Subscription, AmqpError> {
        let subscribe = async {
            let ch = self.channel().await?;
            let mut args = FieldTable::default();
            // exclusive queues cannot be quorum queues, whatever the vhost's default type is
            args.insert(s("x-queue-type"), long("classic"));
            args.insert(s("x-max-length"), AMQPValue::LongLongInt(SUBSCRIPTION_MAX_LENGTH));
            let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
            ch.queue_declare(s(queue), opts, args).await?;
            for (exchange, key) in bindings {
                ch.queue_bind(s(queue), s(exchange), s(key), QueueBindOptions::default(), FieldTable::default())
                    .await?;
            }
            let opts = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
            let consumer = ch.basic_consume(s(queue), s("txpipe-own"), opts, FieldTable::default()).await?;
            Ok(Subscription { channel: ch, consumer })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, subscribe).await.map_err(|_| AmqpError::Disconnected)?
    }

    /// How many messages `queue` holds now (a passive declare: nothing is created).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, AmqpError> {
        let ch = self.channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let depth = ch.queue_declare(s(queue), passive, FieldTable::default()).await.map(|q| q.message_count());
        let _ = ch.close(200, s("counted")).await;
        Ok(depth?)
    }

    /// Deletes every exchange and queue of the namespace (tests, `txpipe topology down`).
    pub async fn teardown(&self) -> Result<(), AmqpError> {
        let ch = self.channel().await?;
        let n = &self.inner.names;
        for stage in Stage::ALL {
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

/// The most messages a [`Broker::subscribe_own`] queue holds before the oldest are dropped.
pub const SUBSCRIPTION_MAX_LENGTH: i64 = 10_000;

/// A process's own subscription ([`Broker::subscribe_own`]).
pub struct Subscription {
    channel: Channel,
    consumer: lapin::Consumer,
}

impl Subscription {
    /// The next message's body; None once the subscription is over (its channel or
    /// connection closed: subscribe again once the link is back).
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        use futures::StreamExt;
        match self.consumer.next().await {
            Some(Ok(delivery)) => Some(delivery.data),
            _ => None,
        }
    }

    /// Closes its channel (the queue goes with the connection, or now if unused).
    pub async fn close(self) {
        let _ = self.channel.close(200, s("done")).await;
    }
}

/// True when the broker answered with this AMQP reply code (403 access refused, 404 not
/// found or unreachable).
fn is_reply(e: &lapin::Error, code: u16) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == code)
}

/// Connects, giving up after [`CONNECT_TIMEOUT`] (an address that drops packets would
/// otherwise hold the attempt for the whole TCP timeout).
async fn connect_within(url: &str) -> Result<Connection, lapin::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, ConnectionProperties::default())).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        ))))),
    }
}

/// Connects to the first address that answers, trying them in turn from `start` (so after a
/// loss the next node is tried first: the one just lost is likely down). Returns the
/// connection and which address it went to, or the last address's error.
async fn connect_any(urls: &[String], start: usize) -> Result<(Connection, usize), lapin::Error> {
    let mut last = None;
    for i in (0..urls.len()).map(|k| (start + k) % urls.len()) {
        match connect_within(&urls[i]).await {
            Ok(conn) => return Ok((conn, i)),
            Err(e) => {
                tracing::debug!(url = %redact(&urls[i]), error = %e, "cannot connect to this RabbitMQ address");
                last = Some(e);
            }
        }
    }
    Err(last.expect("settings have at least one broker address"))
}

/// Watches the connection of a broker and replaces it when it drops, failing over to the
/// broker's other addresses.
async fn supervise(weak: std::sync::Weak<Inner>) {
    let mut count = 1u64;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.closing.load(Ordering::SeqCst) {
            return;
        }
        if inner.conn.read().unwrap_or_else(|p| p.into_inner()).status().connected() {
            continue;
        }
        inner.link.send_replace(Link::Down);
        let lost = inner.current.load(Ordering::SeqCst);
        BrokerLost { url: &redact(&inner.urls[lost]) }.emit();
        let started = tokio::time::Instant::now();
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            if inner.closing.load(Ordering::SeqCst) {
                return;
            }
            match connect_any(&inner.urls, lost + 1).await {
                Ok((conn, at)) => {
                    *inner.conn.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(conn);
                    inner.current.store(at, Ordering::SeqCst);
                    tracing::info!(url = %redact(&inner.urls[at]), "connected to RabbitMQ");
                    count += 1;
                    inner.link.send_replace(Link::Up(count));
                    BrokerReconnected { after: started.elapsed() }.emit();
                    break;
                }
                Err(e) if started.elapsed() >= inner.reconnect_timeout => {
                    tracing::error!(error = %e, timeout_ms = inner.reconnect_timeout.as_millis() as u64, "cannot reconnect to RabbitMQ; giving up");
                    inner.link.send_replace(Link::GaveUp);
                    return;
                }
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "reconnect failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Publishes with confirms: `publish` returns only once the broker has taken the message.
/// Its confirm-mode channel is replaced when it dies; a publish whose confirm was lost with
/// it is sent again on the new one (consumers deduplicate by message id).
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    channel: Arc<tokio::sync::Mutex<Option<Channel>>>,
}

impl Publisher {
    async fn channel(&self) -> Result<Channel, AmqpError> {
        let mut held = self.channel.lock().await;
        if let Some(c) = held.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let c = self.broker.channel().await?;
        tokio::time::timeout(CONFIRM_TIMEOUT, c.confirm_select(ConfirmSelectOptions::default()))
            .await
            .map_err(|_| AmqpError::Disconnected)??;
        *held = Some(c.clone());
        Ok(c)
    }

    /// Publishes persistently and waits for the broker's confirm.
    pub async fn publish(&self, msg: &Outgoing) -> Result<(), AmqpError> {
        let channel = self.channel().await?;
        match self.publish_on(&channel, msg).await {
            Err(e @ (AmqpError::Broker(_) | AmqpError::ConfirmTimeout)) => {
                // the channel (or the connection under it) failed mid-publish: once more on a new one
                tracing::debug!(error = %e, "publish failed; sending again on a new channel");
                *self.channel.lock().await = None;
                let channel = self.channel().await?;
                self.publish_on(&channel, msg).await
            }
            other => other,
        }
    }

    async fn publish_on(&self, channel: &Channel, msg: &Outgoing) -> Result<(), AmqpError> {
        let mut headers = FieldTable::default();
        for (k, v) in &msg.headers {
            headers.insert(s(k), long(v.clone()));
        }
        // what is published while handling a traced message continues its trace: through a
        // publish span of its own when spans are exported (its id is the message's parent)
        let mut span = tracing::Span::none();
        if !msg.headers.iter().any(|(k, _)| k == crate::trace::HEADER) {
            if let Some(t) = crate::trace::current() {
                span = tracing::info_span!(
                    target: crate::telemetry::OTEL_TARGET,
                    "publish",
                    otel.name = %format!("{} publish", msg.exchange),
                    otel.kind = "producer",
                    messaging.system = "rabbitmq",
                    messaging.operation = "publish",
                    messaging.operation.type = "send",
                    messaging.operation.name = "publish",
                    messaging.destination.name = %msg.exchange,
                    messaging.rabbitmq.destination.routing_key = %msg.routing_key,
                    messaging.message.id = %msg.message_id,
                );
                let parent = t.adopt(&span).unwrap_or_else(|| t.child());
                headers.insert(s(crate::trace::HEADER), long(parent.header()));
            }
        }
        self.send(channel, msg, headers).instrument(span).await
    }

    async fn send(&self, channel: &Channel, msg: &Outgoing, headers: FieldTable) -> Result<(), AmqpError> {
        let props = BasicProperties::default()
            .with_content_type(s("application/json"))
            .with_delivery_mode(2)
            .with_message_id(s(&msg.message_id))
            .with_app_id(s("txpipe"))
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        let pending = channel
            .basic_publish(
                s(&msg.exchange),
                s(&msg.routing_key),
                BasicPublishOptions { mandatory: msg.mandatory, ..Default::default() },
                &msg.body,
                props,
            )
            .await?;
        // a confirm can be lost with its connection: do not wait for it forever
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, pending).await.map_err(|_| AmqpError::ConfirmTimeout)??;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => {
                Err(AmqpError::Unroutable { exchange: msg.exchange.clone(), routing_key: msg.routing_key.clone() })
            }
            Confirmation::Nack(_) => Err(AmqpError::Nacked),
        }
    }

    /// True while the broker is connected.
    pub fn is_usable(&self) -> bool {
        self.broker.is_connected()
    }

    /// Closes the confirm channel, waiting for the broker's answer (a later publish opens a new
    /// one). For a service that is done publishing before the connection closes: a channel
    /// whose last handle is merely dropped is closed by lapin in the background, and when the
    /// connection's close overtakes that, lapin logs it as a connection error.
    pub async fn close(&self) {
        let held = self.channel.lock().await.take();
        if let Some(channel) = held.filter(|c| c.status().connected()) {
            let _ = tokio::time::timeout(CONFIRM_TIMEOUT, channel.close(200, s("done"))).await;
        }
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
