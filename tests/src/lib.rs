//! The test harness: a whole txpipe fleet in-process on port 0, with a fresh namespace and
//! data directory per test, against the real RabbitMQ; typed helpers to upload, read
//! statuses, wait for a status, tap notifications and inspect the DLQ.

pub mod aws;
pub mod contract;
pub mod otlp;
pub mod procs;
pub mod proxy;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use txpipe_common::auth::KeyLimits;
use txpipe_common::messages::{Notification, StageMessage};
use txpipe_common::stage::RoutingKey;
use txpipe_common::status::{FileStatus, StatusRecord};
use txpipe_common::storage::{local::LocalLayout, Transaction};
use txpipe_common::{Deps, FileId, Names, Settings};

/// How long `wait_for_status` waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(60);

/// Limits no test reaches by accident.
pub const UNLIMITED: KeyLimits = KeyLimits { daily_quota: 1_000_000, rate_per_second: 100_000.0, burst: 100_000 };

/// Makes a key in `deps`' storage and returns its secret.
pub async fn new_key(deps: &Deps, name: &str, admin: bool, limits: KeyLimits) -> String {
    let (_, secret) = txpipe_common::auth::create_key(deps.storage.keys.as_ref(), name, admin, limits)
        .await
        .expect("create an API key");
    secret.expose().to_owned()
}

/// An HTTP client that sends `key` in `x-api-key` on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(txpipe_common::auth::KEY_HEADER, key.parse().expect("a key is a header value"));
    reqwest::Client::builder().default_headers(headers).build().expect("http client")
}

/// A fresh namespace: `t-` and 12 random hex digits.
pub fn fresh_namespace() -> String {
    format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Settings for a test: fresh namespace and data dir, fast retries, the broker from
/// `TXPIPE_AMQP_URL` if set (the default otherwise).
pub fn test_settings(data_dir: &std::path::Path) -> Settings {
    Settings {
        amqp_url: std::env::var("TXPIPE_AMQP_URL").unwrap_or_else(|_| Settings::default().amqp_url),
        namespace: fresh_namespace(),
        data_dir: data_dir.to_owned(),
        retry_initial_delay_ms: 20,
        log_format: txpipe_common::config::LogFormat::Pretty,
        ..Settings::default()
    }
}

/// A running fleet (gateway + validator + transformer + notifier) for one test.
pub struct TestFleet {
    pub base_url: String,
    pub names: Names,
    pub settings: Settings,
    pub deps: Deps,
    /// Sends [`TestFleet::api_key`] on every request.
    pub http: reqwest::Client,
    /// An admin key made at spawn (limits high enough never to get in a test's way).
    pub api_key: String,
    /// A direct connection to the broker for the test's own use (not through any proxy).
    pub admin: txpipe_common::amqp::Broker,
    /// Set when the fleet runs on moto (TXPIPE_STORAGE=aws): torn down with the fleet.
    aws: Option<aws_config::SdkConfig>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), txpipe_cli::fleet::FleetError>>,
    pub dir: tempfile::TempDir,
}

/// The gateway's answer to an accepted upload.
#[derive(Debug, serde::Deserialize)]
pub struct Accepted {
    pub file_id: FileId,
    pub status: String,
    pub status_url: String,
}

impl TestFleet {
    /// Spawns a fleet on the storage `TXPIPE_TEST_STORAGE` names: `local` (the default) or
    /// `aws` (S3 and DynamoDB on moto, provisioned for the test). `scripts/test` runs the
    /// end-to-end tests once with each.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns a fleet on local storage whatever `TXPIPE_TEST_STORAGE` says.
    pub async fn spawn_local() -> Self {
        Self::spawn_with(|s| s.storage = txpipe_common::config::StorageKind::Local).await
    }

    /// Objects under `uploads/` in the fleet's bucket (or directory).
    pub async fn object_count(&self) -> usize {
        match &self.aws {
            Some(sdk) => {
                let s3 = txpipe_common::storage::aws::S3ObjectStore::new(sdk, &self.settings);
                let out = s3
                    .client()
                    .list_objects_v2()
                    .bucket(self.names.bucket())
                    .prefix("uploads/")
                    .send()
                    .await
                    .expect("list the bucket");
                out.contents().len()
            }
            None => local_object_count(&LocalLayout::of(&self.settings)).await,
        }
    }

    /// Spawns a fleet on S3 and DynamoDB reached through `endpoint` (a proxy in front of moto).
    pub async fn spawn_aws_at(endpoint: &str, tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_inner(tweak, Some(endpoint)).await
    }

    /// Spawns a fleet after letting `tweak` change the test settings.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_inner(tweak, None).await
    }

    async fn spawn_inner(tweak: impl FnOnce(&mut Settings), aws_endpoint: Option<&str>) -> Self {
        let _ = tracing_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = test_settings(dir.path());
        if std::env::var("TXPIPE_TEST_STORAGE").as_deref() == Ok("aws") {
            settings.storage = txpipe_common::config::StorageKind::Aws;
        }
        tweak(&mut settings);
        if aws_endpoint.is_some() {
            settings.storage = txpipe_common::config::StorageKind::Aws;
        }
        let (aws, deps) = match settings.storage {
            txpipe_common::config::StorageKind::Local => {
                (None, Deps::connect(settings.clone()).await.expect("connect to RabbitMQ and open storage"))
            }
            txpipe_common::config::StorageKind::Aws => {
                let (sdk, storage) = aws::provisioned_at(&settings, aws_endpoint.unwrap_or(aws::endpoint())).await;
                let deps = Deps::with_storage(settings.clone(), storage).await.expect("connect to RabbitMQ");
                (Some(sdk), deps)
            }
        };
        let mut direct = settings.clone();
        direct.amqp_url = test_settings(dir.path()).amqp_url;
        let admin = txpipe_common::amqp::Broker::connect(&direct).await.expect("connect to RabbitMQ");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let api_key = new_key(&deps, "test-admin", true, UNLIMITED).await;
        let http = client_with_key(&api_key);
        let task = tokio::spawn(txpipe_cli::fleet::run(listener, deps.clone(), stop.clone().cancelled_owned()));
        let fleet =
            Self { base_url, names: settings.names(), settings, deps, http, api_key, admin, aws, stop, task, dir };
        fleet.wait_ready().await;
        fleet
    }

    /// Another, independent handle on the fleet's storage (its own SQLite connection, or its own
    /// AWS clients), as a second gateway replica would have.
    pub async fn second_storage(&self) -> txpipe_common::storage::Storage {
        match &self.aws {
            Some(sdk) => txpipe_common::storage::Storage::aws(sdk, &self.settings),
            None => txpipe_common::storage::Storage::open(&self.settings).await.expect("open the storage again"),
        }
    }

    /// The header that carries the fleet's admin key, for tests that build raw requests.
    pub fn key_header(&self) -> (&'static str, &str) {
        (txpipe_common::auth::KEY_HEADER, &self.api_key)
    }

    /// Makes another key in the fleet's storage and returns its secret.
    pub async fn new_key(&self, name: &str, admin: bool, limits: KeyLimits) -> String {
        new_key(&self.deps, name, admin, limits).await
    }

    /// A request to the gateway with `key` (or none), not the fleet's admin key.
    pub fn request_as(&self, key: Option<&str>, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = reqwest::Client::new().request(method, format!("{}{path}", self.base_url));
        match key {
            Some(k) => req.header(txpipe_common::auth::KEY_HEADER, k),
            None => req,
        }
    }

    /// Uploads a CSV with `key`, returning the raw response.
    pub async fn upload_as(&self, key: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        let req = self.request_as(Some(key), reqwest::Method::POST, "/upload").header("content-type", "text/csv");
        req.body(body).send().await.expect("gateway reachable")
    }

    /// GET `path` with `key` (or none): the HTTP status and the JSON body.
    pub async fn get_as(&self, key: Option<&str>, path: &str) -> (u16, Value) {
        let resp = self.request_as(key, reqwest::Method::GET, path).send().await.expect("gateway reachable");
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base_url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "fleet never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gateway's `host:port`, for raw TCP clients.
    pub fn addr(&self) -> &str {
        self.base_url.trim_start_matches("http://")
    }

    /// Uploads recorded but never announced (with any age): what must never be left behind.
    pub async fn unannounced(&self) -> Vec<FileId> {
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        self.deps.storage.statuses.unannounced(later, 1000).await.expect("list unannounced uploads")
    }

    /// POSTs `body` to /upload with `content_type`, returning the raw response.
    pub async fn post_upload(&self, body: impl Into<reqwest::Body>, content_type: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/upload", self.base_url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("gateway reachable")
    }

    /// Uploads a CSV and asserts it was accepted (202).
    pub async fn upload(&self, body: impl Into<reqwest::Body>) -> Accepted {
        let resp = self.post_upload(body, "text/csv").await;
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 202, "upload refused: {text}");
        serde_json::from_str(&text).expect("upload answer is JSON")
    }

    /// GET /files/{id} as JSON, with its HTTP status.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(format!("{}{path}", self.base_url)).send().await.expect("gateway reachable");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// GET that asks again while the gateway answers 503 (storage or broker briefly away), as
    /// any client should, up to [`WAIT`]; then the answer must be 200.
    pub async fn get_ok(&self, path: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (code, body) = self.get_json(path).await;
            if code == 503 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
                continue;
            }
            assert_eq!(code, 200, "{body}");
            return body;
        }
    }

    /// The file's status record (panics unless the gateway answers 200).
    pub async fn status(&self, file_id: FileId) -> StatusRecord {
        let (code, body) = self.get_json(&format!("/files/{file_id}")).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_value(body).expect("status record")
    }

    /// Polls until the file reaches one of `wanted`; fails the test (with the record) otherwise.
    pub async fn wait_for_status(&self, file_id: FileId, wanted: &[FileStatus]) -> StatusRecord {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let body = self.get_ok(&format!("/files/{file_id}")).await;
            let record: StatusRecord = serde_json::from_value(body).expect("status record");
            if wanted.contains(&record.status) {
                return record;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("file {file_id} never reached {wanted:?}: {record:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Every stored transaction of a file, following `next_cursor` with pages of `limit`.
    pub async fn transactions(&self, file_id: FileId, limit: usize) -> Vec<Transaction> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/files/{file_id}/transactions?limit={limit}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let body = self.get_ok(&path).await;
            let items: Vec<Transaction> = serde_json::from_value(body["items"].clone()).unwrap();
            assert!(items.len() <= limit);
            all.extend(items);
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return all,
            }
        }
    }

    /// A channel of our own on the fleet's broker.
    pub async fn channel(&self) -> lapin::Channel {
        self.admin.channel().await.expect("channel")
    }

    /// A fresh exclusive queue bound to `exchange` with `pattern`, consumed without acks: a
    /// copy of every message that passes (the queue goes with the channel).
    pub async fn tap(&self, exchange: &str, pattern: &str) -> (lapin::Channel, lapin::Consumer) {
        let ch = self.channel().await;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "tap".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        (ch, consumer)
    }

    /// Binds a fresh exclusive queue to the notifications exchange (all routing keys).
    pub async fn tap_notifications(&self) -> NotificationTap {
        let (ch, consumer) = self.tap(&self.names.notifications_exchange(), "#").await;
        NotificationTap { _ch: ch, consumer }
    }

    /// Messages now in the DLQ.
    pub async fn dlq_count(&self) -> u32 {
        let ch = self.channel().await;
        let q = ch
            .queue_declare(
                self.names.dead_letter_queue().as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("the DLQ exists");
        q.message_count()
    }

    /// Takes one message from the DLQ (acking it): its routing key, headers and body.
    pub async fn dlq_take(&self) -> Option<DeadLetter> {
        let ch = self.channel().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(m) =
                ch.basic_get(self.names.dead_letter_queue().as_str().into(), BasicGetOptions::default()).await.unwrap()
            {
                m.delivery.ack(BasicAckOptions::default()).await.unwrap();
                let mut headers = std::collections::BTreeMap::new();
                if let Some(h) = m.delivery.properties.headers() {
                    for (k, v) in h.inner() {
                        match v {
                            AMQPValue::LongString(s) => {
                                headers.insert(k.to_string(), s.to_string());
                            }
                            AMQPValue::ShortString(s) => {
                                headers.insert(k.to_string(), s.to_string());
                            }
                            _ => {}
                        }
                    }
                }
                return Some(DeadLetter {
                    routing_key: m.delivery.routing_key.to_string(),
                    headers,
                    body: m.delivery.data,
                });
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Publishes raw bytes to the pipeline exchange, as a misbehaving producer might.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        let ch = self.channel().await;
        ch.basic_publish(
            self.names.pipeline_exchange().as_str().into(),
            routing_key.into(),
            Default::default(),
            body,
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
        let _ = ch.close(200, "done".into()).await;
    }

    /// Waits (up to `within`) for the fleet to stop by itself, returning how it stopped, then
    /// deletes the namespace's topology.
    pub async fn stopped_on_its_own(self, within: Duration) -> Option<Result<(), txpipe_cli::fleet::FleetError>> {
        let result = tokio::time::timeout(within, self.task).await.ok().map(|r| r.expect("fleet task"));
        self.stop.cancel();
        self.admin.teardown().await.expect("teardown");
        self.admin.close().await;
        result
    }

    /// Stops the fleet, checks it stopped cleanly, and deletes the namespace's topology.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(40), self.task).await.expect("fleet stops in time");
        result.expect("fleet task").expect("fleet stopped without error");
        match &self.aws {
            Some(sdk) => {
                let mut direct = self.settings.clone();
                direct.amqp_url = test_settings(self.dir.path()).amqp_url;
                aws::teardown(&direct, sdk).await
            }
            None => self.admin.teardown().await.expect("teardown"),
        }
        self.deps.broker.close().await;
        self.admin.close().await;
    }
}

/// One dead-lettered message.
#[derive(Debug)]
pub struct DeadLetter {
    pub routing_key: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// Notifications as a subscriber sees them.
pub struct NotificationTap {
    _ch: lapin::Channel,
    consumer: lapin::Consumer,
}

/// One received notification.
#[derive(Debug)]
pub struct Received {
    pub routing_key: String,
    pub message_id: String,
    /// The W3C trace context the notification carries.
    pub traceparent: Option<String>,
    pub body: Notification,
}

impl NotificationTap {
    /// The next notification, or None after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Received> {
        let d = tokio::time::timeout(wait, self.consumer.next()).await.ok()??.ok()?;
        Some(Received {
            routing_key: d.routing_key.to_string(),
            message_id: d.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default(),
            traceparent: d.properties.headers().as_ref().and_then(|h| match h.inner().get("traceparent") {
                Some(AMQPValue::LongString(v)) => Some(v.to_string()),
                _ => None,
            }),
            body: serde_json::from_slice(&d.data).expect("notification body is JSON"),
        })
    }

    /// Notifications until none arrives for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(n) = self.next(quiet).await {
            out.push(n);
        }
        out
    }
}

/// Deletes a queue of the fleet's namespace (to make publishing fail).
pub async fn delete_queue(fleet: &TestFleet, name: &str) {
    let ch = fleet.channel().await;
    ch.queue_delete(name.into(), QueueDeleteOptions::default()).await.unwrap();
}

/// Logs to the test's output when `RUST_LOG` is set.
fn tracing_init() -> Option<()> {
    std::env::var("RUST_LOG").ok()?;
    txpipe_common::telemetry::init("test", txpipe_common::config::LogFormat::Pretty);
    Some(())
}

/// A CSV with a header and `rows` valid rows whose ids start with `prefix`.
pub fn valid_csv(prefix: &str, rows: usize) -> String {
    let mut s = String::from("transaction_id,amount,currency,timestamp,merchant,status\n");
    for i in 0..rows {
        s.push_str(&format!(
            "{prefix}-{i:06},{}.{:02},USD,2024-01-15T10:30:00Z,Merchant {i},completed\n",
            i * 3,
            i % 100
        ));
    }
    s
}

/// A message on `key` about a file nobody uploaded (its object does not exist either).
pub fn ghost(key: RoutingKey) -> StageMessage {
    let record = StatusRecord::uploaded(FileId::new(), "uploads/ghost.csv".into(), 1, chrono::Utc::now());
    StageMessage::from_record(key, &record)
}

/// A file's record as the gateway at `base` answers `GET /files/{id}`.
pub async fn http_status(http: &reqwest::Client, base: &str, id: &str) -> Value {
    http.get(format!("{base}/files/{id}")).send().await.unwrap().json().await.unwrap()
}

/// Waits (polling the gateway at `base`) until the file is in one of `any`, for at most
/// `within`; returns its record.
pub async fn wait_http_status(http: &reqwest::Client, base: &str, id: &str, any: &[&str], within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = http_status(http, base, id).await;
        if any.iter().any(|s| v["status"] == *s) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "file {id} never reached any of {any:?}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Objects under `uploads/` in a local namespace: rows of its objects table (small files) and
/// files under its directory (large ones).
pub async fn local_object_count(layout: &LocalLayout) -> usize {
    let db = txpipe_common::storage::sqlite::SqliteStore::open(&layout.database(), &layout.names)
        .await
        .expect("open the database");
    let rows = db.object_count("uploads/").await.expect("count the objects table");
    let files = std::fs::read_dir(layout.objects_dir().join("uploads")).map(|d| d.count()).unwrap_or(0);
    rows + files
}
