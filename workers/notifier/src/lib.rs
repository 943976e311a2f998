//! The notifier: consumes `file.processed` and `file.rejected` and publishes a notification to
//! `{ns}.notifications` (`file.completed` or `file.rejected`), the notification confirmed
//! before the file is marked `completed`. Every copy of one notification has the same
//! message id, so subscribers can drop the duplicates that at-least-once delivery allows.

use async_trait::async_trait;
use std::sync::Arc;
use txpipe_common::messages::{Stage, FILE_PROCESSED, FILE_REJECTED, NOTIFY_COMPLETED, NOTIFY_REJECTED};
use txpipe_common::status::{FileStatus, StatusUpdate};
use txpipe_common::storage::Advance;
use txpipe_common::worker::{status_of, storage_failure, Handler, Incoming, Outcome};
use txpipe_common::Deps;

/// The notifier stage.
pub struct Notifier {
    deps: Deps,
}

impl Notifier {
    pub fn new(deps: Deps) -> Self {
        Self { deps }
    }

    async fn completed(&self, msg: &Incoming) -> Outcome {
        let statuses = &self.deps.storage.statuses;
        let file_id = msg.event.file_id;
        let record = match status_of(&self.deps, file_id).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        match record.status {
            // notification_failed: a replayed or retried message tries again
            FileStatus::Processed | FileStatus::Notifying | FileStatus::NotificationFailed => {}
            // completed only after the notification was confirmed: nothing left to do
            s if s.is_at_or_past(FileStatus::Completed) || s.is_final() => return Outcome::Done(Vec::new()),
            s => {
                return Outcome::DeadLetter(format!("file {file_id} is {s}, not processed: no completion to announce"))
            }
        }
        let record =
            match statuses.advance(file_id, FileStatus::Notifying, StatusUpdate::default(), chrono::Utc::now()).await {
                Ok(Advance::Moved(r) | Advance::Refused(r)) => r,
                Err(e) => return storage_failure("recording status notifying", &e),
            };
        let mut final_view = record.clone();
        final_view.status = FileStatus::Completed;
        if let Err(e) = self.deps.publisher.publish(&self.deps.notification(NOTIFY_COMPLETED, &final_view)).await {
            return Outcome::Retry(format!("publishing the notification failed: {e}"));
        }
        match statuses.advance(file_id, FileStatus::Completed, StatusUpdate::default(), chrono::Utc::now()).await {
            Ok(_) => {
                tracing::info!(%file_id, "completed");
                Outcome::Done(Vec::new())
            }
            Err(e) => storage_failure("recording status completed", &e),
        }
    }

    async fn rejected(&self, msg: &Incoming) -> Outcome {
        let file_id = msg.event.file_id;
        let record = match status_of(&self.deps, file_id).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        if record.status != FileStatus::ValidationFailed {
            return Outcome::DeadLetter(format!(
                "file {file_id} is {}, not validation_failed: no rejection to announce",
                record.status
            ));
        }
        // the status stays validation_failed: the rejection is the file's final word
        match self.deps.publisher.publish(&self.deps.notification(NOTIFY_REJECTED, &record)).await {
            Ok(()) => {
                tracing::info!(%file_id, "rejection announced");
                Outcome::Done(Vec::new())
            }
            Err(e) => Outcome::Retry(format!("publishing the notification failed: {e}")),
        }
    }
}

#[async_trait]
impl Handler for Notifier {
    fn stage(&self) -> Stage {
        Stage::Notifier
    }

    /// A rejection's status stays validation_failed; only a completion can fail here.
    fn tracks_status(&self, msg: &Incoming) -> bool {
        msg.routing_key == FILE_PROCESSED
    }

    async fn handle(&self, msg: &Incoming) -> Outcome {
        match msg.routing_key.as_str() {
            FILE_PROCESSED => self.completed(msg).await,
            FILE_REJECTED => self.rejected(msg).await,
            other => Outcome::DeadLetter(format!("the notifier does not handle routing key {other:?}")),
        }
    }
}

/// Runs the notifier until `shutdown`: declares its queues, then consumes.
pub async fn run(
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), txpipe_common::amqp::AmqpError> {
    let handler = Arc::new(Notifier::new(deps.clone()));
    txpipe_common::worker::run(&deps, handler, shutdown).await
}
