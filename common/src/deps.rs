//! What every service holds: settings, names, storage and the broker, built once at startup.

use crate::amqp::{AmqpError, Broker, Publisher};
use crate::config::Settings;
use crate::names::Names;
use crate::storage::{Storage, StorageError};
use std::sync::Arc;

/// Why a service could not start; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

/// Shared dependencies of a service; cheap to clone.
#[derive(Clone)]
pub struct Deps {
    pub settings: Arc<Settings>,
    pub names: Names,
    pub storage: Storage,
    pub broker: Broker,
    pub publisher: Publisher,
}

impl Deps {
    /// Opens storage and connects to the broker.
    pub async fn connect(settings: Settings) -> Result<Self, StartupError> {
        let storage = Storage::open(&settings).await?;
        Self::with_storage(settings, storage).await
    }

    /// Connects to the broker, using storage opened elsewhere (tests, `txpipe up`).
    pub async fn with_storage(settings: Settings, storage: Storage) -> Result<Self, StartupError> {
        let broker = Broker::connect(&settings).await?;
        let publisher = broker.publisher().await?;
        Ok(Self { names: settings.names(), settings: Arc::new(settings), storage, broker, publisher })
    }

    /// Ok when the broker is connected and storage answers; otherwise why not.
    pub async fn readiness(&self) -> Result<(), String> {
        if !self.broker.is_connected() || !self.publisher.is_usable() {
            return Err("not connected to RabbitMQ".into());
        }
        self.storage.check().await.map_err(|e| e.to_string())
    }
}

use crate::amqp::Outgoing;
use crate::messages::{FileEvent, FileId, Notification, Stage, NOTIFY_FAILED};
use crate::status::{FileStatus, StatusRecord, StatusUpdate};
use crate::storage::Advance;

impl Deps {
    /// A stage message for the pipeline exchange, with its stable message id.
    pub fn stage_message(&self, routing_key: &str, event: &FileEvent) -> Outgoing {
        Outgoing {
            exchange: self.names.pipeline_exchange(),
            routing_key: routing_key.to_owned(),
            body: event.to_body(),
            message_id: event.message_id(routing_key),
            mandatory: true,
            headers: Vec::new(),
        }
    }

    /// A notification about `record` for the notifications exchange. Its id is the same for
    /// every copy (`{file_id}:{routing_key}`), so subscribers can drop duplicates.
    pub fn notification(&self, routing_key: &str, record: &StatusRecord) -> Outgoing {
        let body = Notification {
            file_id: record.file_id,
            status: record.status,
            records_processed: record.records_processed.unwrap_or(0),
            error_count: record.error_count.unwrap_or(0),
            row_count: record.row_count.unwrap_or(0),
            timestamp: chrono::Utc::now(),
        };
        Outgoing {
            exchange: self.names.notifications_exchange(),
            routing_key: routing_key.to_owned(),
            body: serde_json::to_vec(&body).expect("a notification always serializes"),
            message_id: format!("{}:{routing_key}", record.file_id),
            // like an SNS topic, a notification with no subscriber is not an error
            mandatory: false,
            headers: Vec::new(),
        }
    }

    /// Records that `stage` gave up on a file and tells subscribers (`file.failed`).
    /// Best effort: called on the way to the DLQ, which keeps the message whatever happens here.
    pub async fn mark_failed(&self, stage: Stage, file_id: FileId, reason: &str) {
        self.record_failure(stage, file_id, reason, true).await
    }

    /// Records a failure of `stage`, publishing `file.failed` only if `notify`.
    pub async fn record_failure(&self, stage: Stage, file_id: FileId, reason: &str, notify: bool) {
        let to = match stage {
            Stage::Gateway | Stage::Validator => FileStatus::ValidationFailed,
            Stage::Transformer => FileStatus::ProcessingFailed,
            Stage::Notifier => FileStatus::NotificationFailed,
        };
        let update = StatusUpdate { reason: Some(format!("{stage}: {reason}")), ..Default::default() };
        match self.storage.statuses.advance(file_id, to, update, chrono::Utc::now()).await {
            Ok(Advance::Moved(record)) if !notify => {
                tracing::info!(%file_id, status = %record.status, "failure recorded")
            }
            Ok(Advance::Moved(record)) => {
                if let Err(e) = self.publisher.publish(&self.notification(NOTIFY_FAILED, &record)).await {
                    tracing::warn!(%file_id, error = %e, "cannot publish the file.failed notification");
                }
            }
            Ok(Advance::Refused(record)) => {
                tracing::info!(%file_id, status = %record.status, "file already past this stage; status left as is")
            }
            Err(e) => {
                tracing::warn!(%file_id, error = %e, "cannot record the failure in the status table")
            }
        }
    }
}
