//! Prometheus metrics as typed events, rendered at `GET /metrics` by every binary.
//!
//! Code does not touch a metric by name: it builds the event for what happened and calls
//! [`InternalEvent::emit`], which counts it (and, for events worth a log line, logs it). Every
//! metric lives in one process-wide registry; [`names`] reads their names from the descriptors of
//! the collectors registered there, and compose/prometheus/alerts.yml may alert only on those.
//! (The text encoder writes a series' labels sorted by name, e.g. `{outcome=..,stage=..}`.)
//!
//! | metric | type | labels | event |
//! |---|---|---|---|
//! | `txpipe_uploads_total` | counter | `result` | [`UploadFinished`] |
//! | `txpipe_upload_bytes_total` | counter | | [`UploadStored`] |
//! | `txpipe_messages_total` | counter | `stage`, `outcome` | [`MessageHandled`] |
//! | `txpipe_message_seconds` | histogram | `stage` | [`MessageTimed`] |
//! | `txpipe_dead_letters_total` | counter | `stage`, `class` | [`DeadLettered`] |
//! | `txpipe_rows_validated_total`, `txpipe_files_rejected_total` | counter | | [`ValidationFinished`] |
//! | `txpipe_rows_stored_total` | counter | | [`RowsStored`] |
//! | `txpipe_broker_connected` | gauge (1/0) | | [`BrokerConnected`], [`BrokerLost`], [`BrokerReconnected`] |
//! | `txpipe_broker_reconnects_total` | counter | | [`BrokerReconnected`] |
//! | `txpipe_files_finished_total` | counter | `status` | [`FileFinished`] |
//! | `txpipe_storage_calls_total` | counter | `service`, `operation` | [`StorageCall`] |
//! | `txpipe_dlq_messages` | gauge | | [`DlqDepth`] |
//! | `txpipe_files_resumed_total` | counter | `stage` | [`FileResumed`] |
//! | `txpipe_copies_waited_total` | counter | `stage` | [`CopyWaited`] |

use crate::dead_letter::ErrorClass;
use crate::file_id::FileId;
use crate::stage::Stage;
use crate::status::FileStatus;
use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use std::sync::LazyLock;
use std::time::Duration;

/// Something that happened which txpipe counts: `emit` records it (and logs it, where that is
/// the one place it is logged).
pub trait InternalEvent {
    fn emit(self);
}

/// Handling-time buckets, in seconds.
const SECONDS_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

struct Metrics {
    registry: Registry,
    uploads: IntCounterVec,
    upload_bytes: IntCounter,
    messages: IntCounterVec,
    message_seconds: HistogramVec,
    dead_letters: IntCounterVec,
    rows_validated: IntCounter,
    files_rejected: IntCounter,
    rows_stored: IntCounter,
    broker_connected: IntGauge,
    broker_reconnects: IntCounter,
    files_finished: IntCounterVec,
    storage_calls: IntCounterVec,
    dlq_messages: IntGauge,
    files_resumed: IntCounterVec,
    copies_waited: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            uploads: counters(Opts::new("txpipe_uploads_total", "Uploads answered, by result"), &["result"]),
            upload_bytes: counter(Opts::new("txpipe_upload_bytes_total", "Bytes of accepted uploads")),
            messages: counters(
                Opts::new("txpipe_messages_total", "Messages handled, by stage and outcome"),
                &["stage", "outcome"],
            ),
            message_seconds: HistogramVec::new(
                HistogramOpts::new("txpipe_message_seconds", "Time to handle a message, by stage")
                    .buckets(SECONDS_BUCKETS.to_vec()),
                &["stage"],
            )
            .expect("valid histogram"),
            dead_letters: counters(
                Opts::new("txpipe_dead_letters_total", "Messages dead-lettered, by stage and error class"),
                &["stage", "class"],
            ),
            rows_validated: counter(Opts::new("txpipe_rows_validated_total", "CSV rows validated")),
            files_rejected: counter(Opts::new("txpipe_files_rejected_total", "Files that failed validation")),
            rows_stored: counter(Opts::new("txpipe_rows_stored_total", "Transactions stored")),
            broker_connected: IntGauge::with_opts(Opts::new(
                "txpipe_broker_connected",
                "1 while connected to RabbitMQ, 0 while not",
            ))
            .expect("valid gauge"),
            broker_reconnects: counter(Opts::new("txpipe_broker_reconnects_total", "Reconnections to RabbitMQ")),
            files_finished: counters(
                Opts::new("txpipe_files_finished_total", "Files that reached a final status, by status"),
                &["status"],
            ),
            storage_calls: counters(
                Opts::new(
                    "txpipe_storage_calls_total",
                    "S3 and DynamoDB requests sent (retries included), by operation",
                ),
                &["service", "operation"],
            ),
            dlq_messages: IntGauge::with_opts(Opts::new(
                "txpipe_dlq_messages",
                "Messages in the dead-letter queue, as last seen (read when /metrics is scraped)",
            ))
            .expect("valid gauge"),
            files_resumed: counters(
                Opts::new(
                    "txpipe_files_resumed_total",
                    "Files found stuck in a stage's working status (no live attempt) and resumed, by stage",
                ),
                &["stage"],
            ),
            copies_waited: counters(
                Opts::new(
                    "txpipe_copies_waited_total",
                    "Copies of a message that found another attempt working on their file and waited for it, by stage",
                ),
                &["stage"],
            ),
        };
        for c in m.collectors() {
            m.registry.register(c).expect("each metric is registered once, under its own name");
        }
        m
    }

    /// Every metric, as registered (handles share their values with the fields).
    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.uploads.clone()),
            Box::new(self.upload_bytes.clone()),
            Box::new(self.messages.clone()),
            Box::new(self.message_seconds.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.rows_validated.clone()),
            Box::new(self.files_rejected.clone()),
            Box::new(self.rows_stored.clone()),
            Box::new(self.broker_connected.clone()),
            Box::new(self.broker_reconnects.clone()),
            Box::new(self.files_finished.clone()),
            Box::new(self.storage_calls.clone()),
            Box::new(self.dlq_messages.clone()),
            Box::new(self.files_resumed.clone()),
            Box::new(self.copies_waited.clone()),
        ]
    }
}

fn counter(opts: Opts) -> IntCounter {
    IntCounter::with_opts(opts).expect("valid counter")
}

fn counters(opts: Opts, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(opts, labels).expect("valid counter")
}

/// The names of every metric txpipe registers (alert rules may only use these).
pub fn names() -> Vec<String> {
    METRICS.collectors().iter().flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone())).collect()
}

/// The metrics in Prometheus's text format (`text/plain; version=0.0.4`).
pub fn render() -> String {
    let mut out = String::new();
    TextEncoder::new().encode_utf8(&METRICS.registry.gather(), &mut out).expect("text encoding into memory");
    out
}

/// The gateway answered an upload: `result` is `accepted` or the error's code.
pub struct UploadFinished {
    pub result: &'static str,
}

impl InternalEvent for UploadFinished {
    fn emit(self) {
        METRICS.uploads.with_label_values(&[self.result]).inc();
    }
}

/// An upload was stored and announced.
pub struct UploadStored {
    pub file_id: FileId,
    pub bytes: u64,
}

impl InternalEvent for UploadStored {
    fn emit(self) {
        tracing::info!(file_id = %self.file_id, size_bytes = self.bytes, "upload accepted");
        METRICS.upload_bytes.inc_by(self.bytes);
    }
}

/// How the worker loop finished with one delivery (or one attempt, for `Retried`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageOutcome {
    Done,
    Retried,
    DeadLettered,
    Malformed,
    Panicked,
    Abandoned,
    /// A copy of a message whose file another attempt holds or has ended: acked, nothing done.
    Duplicate,
}

impl MessageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageOutcome::Done => "done",
            MessageOutcome::Retried => "retried",
            MessageOutcome::DeadLettered => "dead_lettered",
            MessageOutcome::Malformed => "malformed",
            MessageOutcome::Panicked => "panicked",
            MessageOutcome::Abandoned => "abandoned",
            MessageOutcome::Duplicate => "duplicate",
        }
    }
}

/// A stage's worker loop finished with a message (the loop logs why, with the details).
pub struct MessageHandled {
    pub stage: Stage,
    pub outcome: MessageOutcome,
}

impl InternalEvent for MessageHandled {
    fn emit(self) {
        METRICS.messages.with_label_values(&[self.stage.as_str(), self.outcome.as_str()]).inc();
    }
}

/// How long a stage took over a message, however its handling ended.
pub struct MessageTimed {
    pub stage: Stage,
    pub seconds: f64,
}

impl InternalEvent for MessageTimed {
    fn emit(self) {
        METRICS.message_seconds.with_label_values(&[self.stage.as_str()]).observe(self.seconds);
    }
}

/// A stage copied a message to the dead-letter exchange (the loop logs why).
pub struct DeadLettered {
    pub stage: Stage,
    pub class: ErrorClass,
}

impl InternalEvent for DeadLettered {
    fn emit(self) {
        METRICS.dead_letters.with_label_values(&[self.stage.as_str(), self.class.as_str()]).inc();
    }
}

/// The validator checked a file: `status` is `validated` or `validation_failed` (a rejected file).
pub struct ValidationFinished {
    pub file_id: FileId,
    pub rows: u64,
    pub errors: u64,
    pub status: FileStatus,
}

impl InternalEvent for ValidationFinished {
    fn emit(self) {
        tracing::info!(file_id = %self.file_id, rows = self.rows, errors = self.errors, status = %self.status, "validated");
        METRICS.rows_validated.inc_by(self.rows);
        if self.status == FileStatus::ValidationFailed {
            METRICS.files_rejected.inc();
        }
    }
}

/// The transformer stored a file's transactions.
pub struct RowsStored {
    pub file_id: FileId,
    pub rows: u64,
}

impl InternalEvent for RowsStored {
    fn emit(self) {
        tracing::info!(file_id = %self.file_id, rows = self.rows, "transactions stored");
        METRICS.rows_stored.inc_by(self.rows);
    }
}

/// The first connection to RabbitMQ is up.
pub struct BrokerConnected;

impl InternalEvent for BrokerConnected {
    fn emit(self) {
        METRICS.broker_connected.set(1);
    }
}

/// The connection to RabbitMQ dropped; reconnecting starts.
pub struct BrokerLost<'a> {
    /// The broker's address, credentials redacted.
    pub url: &'a str,
}

impl InternalEvent for BrokerLost<'_> {
    fn emit(self) {
        METRICS.broker_connected.set(0);
        tracing::warn!(url = %self.url, "connection to RabbitMQ lost; reconnecting");
    }
}

/// The connection to RabbitMQ is back, `after` it was lost.
pub struct BrokerReconnected {
    pub after: Duration,
}

impl InternalEvent for BrokerReconnected {
    fn emit(self) {
        METRICS.broker_connected.set(1);
        METRICS.broker_reconnects.inc();
        tracing::info!(after_ms = self.after.as_millis() as u64, "reconnected to RabbitMQ");
    }
}

/// A file reached a final status (completed, validation_failed, or a stage's `*_failed`).
pub struct FileFinished {
    pub status: FileStatus,
}

impl InternalEvent for FileFinished {
    fn emit(self) {
        METRICS.files_finished.with_label_values(&[self.status.as_str()]).inc();
    }
}

/// A request went to S3 or DynamoDB (`service` as the SDK names it, e.g. `s3`, `dynamodb`;
/// `operation` e.g. `PutObject`, `UpdateItem`). Each retry is a request of its own.
pub struct StorageCall<'a> {
    pub service: &'a str,
    pub operation: &'a str,
}

impl InternalEvent for StorageCall<'_> {
    fn emit(self) {
        METRICS.storage_calls.with_label_values(&[&self.service.to_ascii_lowercase(), self.operation]).inc();
    }
}

/// How many messages the dead-letter queue holds.
pub struct DlqDepth {
    pub messages: u32,
}

impl InternalEvent for DlqDepth {
    fn emit(self) {
        METRICS.dlq_messages.set(i64::from(self.messages));
    }
}

/// The stuck-file sweep found a file in a working status with no live attempt and published
/// its stage's message again.
pub struct FileResumed {
    pub stage: Stage,
    pub file_id: FileId,
    pub status: FileStatus,
}

impl InternalEvent for FileResumed {
    fn emit(self) {
        METRICS.files_resumed.with_label_values(&[self.stage.as_str()]).inc();
        tracing::warn!(stage = %self.stage, file_id = %self.file_id, status = %self.status,
            "resumed a file stuck in its working status (its last attempt left no outcome)");
    }
}

/// A copy of a stage message found another attempt live on its file and waits for it to end
/// (a redelivery while the first still runs, or a duplicate publish).
pub struct CopyWaited {
    pub stage: Stage,
    pub file_id: FileId,
}

impl InternalEvent for CopyWaited {
    fn emit(self) {
        METRICS.copies_waited.with_label_values(&[self.stage.as_str()]).inc();
        tracing::info!(stage = %self.stage, file_id = %self.file_id, "another attempt is working on this file; waiting for it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `series` (labels in the order the encoder writes them: by name, `le` last).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_event_counts_under_its_exact_name_and_labels() {
        // the registry is process-wide and other tests may emit too: compare before and after
        let before = render();
        let id = FileId::new();
        UploadFinished { result: "accepted" }.emit();
        UploadFinished { result: "empty_body" }.emit();
        UploadStored { file_id: id, bytes: 42 }.emit();
        let outcomes = [
            MessageOutcome::Done,
            MessageOutcome::Retried,
            MessageOutcome::DeadLettered,
            MessageOutcome::Malformed,
            MessageOutcome::Panicked,
            MessageOutcome::Abandoned,
            MessageOutcome::Duplicate,
        ];
        for outcome in outcomes {
            MessageHandled { stage: Stage::Validator, outcome }.emit();
        }
        MessageTimed { stage: Stage::Transformer, seconds: 0.02 }.emit();
        DeadLettered { stage: Stage::Notifier, class: ErrorClass::RetriesExhausted }.emit();
        ValidationFinished { file_id: id, rows: 7, errors: 0, status: FileStatus::Validated }.emit();
        ValidationFinished { file_id: id, rows: 3, errors: 1, status: FileStatus::ValidationFailed }.emit();
        RowsStored { file_id: id, rows: 7 }.emit();
        BrokerConnected.emit();
        BrokerLost { url: "amqp://localhost:5672" }.emit();
        BrokerReconnected { after: Duration::from_millis(5) }.emit();
        FileFinished { status: FileStatus::Completed }.emit();
        StorageCall { service: "DynamoDB", operation: "UpdateItem" }.emit();
        DlqDepth { messages: 3 }.emit();
        FileResumed { stage: Stage::Transformer, file_id: id, status: FileStatus::Processing }.emit();
        let after = render();

        let grew = |series: &str, by: f64| {
            let now = value(&after, series).unwrap_or_else(|| panic!("{series} missing from:\n{after}"));
            assert!(now - value(&before, series).unwrap_or(0.0) >= by, "{series} grew by {by}:\n{after}");
        };
        grew(r#"txpipe_uploads_total{result="accepted"}"#, 1.0);
        grew(r#"txpipe_uploads_total{result="empty_body"}"#, 1.0);
        grew("txpipe_upload_bytes_total", 42.0);
        grew(r#"txpipe_files_resumed_total{stage="transformer"}"#, 1.0);
        for outcome in ["done", "retried", "dead_lettered", "malformed", "panicked", "abandoned", "duplicate"] {
            grew(&format!(r#"txpipe_messages_total{{outcome="{outcome}",stage="validator"}}"#), 1.0);
        }
        grew(r#"txpipe_message_seconds_bucket{stage="transformer",le="0.025"}"#, 1.0);
        grew(r#"txpipe_message_seconds_count{stage="transformer"}"#, 1.0);
        grew(r#"txpipe_dead_letters_total{class="retries_exhausted",stage="notifier"}"#, 1.0);
        grew("txpipe_rows_validated_total", 10.0);
        grew("txpipe_files_rejected_total", 1.0);
        grew(r#"txpipe_files_finished_total{status="completed"}"#, 1.0);
        grew(r#"txpipe_storage_calls_total{operation="UpdateItem",service="dynamodb"}"#, 1.0);
        assert_eq!(value(&after, "txpipe_dlq_messages"), Some(3.0));
        grew("txpipe_rows_stored_total", 7.0);
        grew("txpipe_broker_reconnects_total", 1.0);
        assert!(value(&after, "txpipe_broker_connected").is_some(), "{after}");
        for (name, kind) in [
            ("txpipe_uploads_total", "counter"),
            ("txpipe_messages_total", "counter"),
            ("txpipe_message_seconds", "histogram"),
            ("txpipe_broker_connected", "gauge"),
        ] {
            assert!(after.contains(&format!("# TYPE {name} {kind}\n")), "{name} is a {kind}:\n{after}");
        }
        let buckets: Vec<&str> = after
            .lines()
            .filter_map(|l| l.strip_prefix(r#"txpipe_message_seconds_bucket{stage="transformer",le=""#))
            .filter_map(|l| l.split('"').next())
            .collect();
        let expected =
            ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "+Inf"];
        assert_eq!(buckets, expected);
    }

    #[test]
    fn names_are_the_registered_metrics() {
        let mut names = names();
        names.sort();
        let expected = [
            "txpipe_broker_connected",
            "txpipe_broker_reconnects_total",
            "txpipe_copies_waited_total",
            "txpipe_dead_letters_total",
            "txpipe_dlq_messages",
            "txpipe_files_finished_total",
            "txpipe_files_rejected_total",
            "txpipe_files_resumed_total",
            "txpipe_message_seconds",
            "txpipe_messages_total",
            "txpipe_rows_stored_total",
            "txpipe_rows_validated_total",
            "txpipe_storage_calls_total",
            "txpipe_upload_bytes_total",
            "txpipe_uploads_total",
        ];
        assert_eq!(names, expected);
    }
}
