//! The notifier: consumes `file.processed` and `file.rejected` and publishes a notification to
//! `{ns}.notifications` (`file.completed` or `file.rejected`), the notification confirmed
//! before the file is marked `completed`. Every copy of one notification has the same
//! message id, so subscribers can drop the duplicates that at-least-once delivery allows.

use async_trait::async_trait;
use txpipe_common::messages::{Notification, StageMessage};
use txpipe_common::stage::{NotificationKey, Stage};
use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate};
use txpipe_common::worker::{Failure, Handler, Passed, Step};
use txpipe_common::Deps;

/// The notifier stage.
pub struct Notifier {
    deps: Deps,
}

impl Notifier {
    pub fn new(deps: Deps) -> Self {
        Self { deps }
    }

    async fn announce(&self, key: NotificationKey, note: Notification) -> Result<(), Failure> {
        let msg = note.outgoing(key, &self.deps.names);
        self.deps
            .publisher
            .publish(&msg)
            .await
            .map_err(|e| Failure::Retry(format!("publishing the notification failed: {e}")))
    }
}

#[async_trait]
impl Handler for Notifier {
    fn stage(&self) -> Stage {
        Stage::Notifier
    }

    async fn work(&self, msg: &StageMessage, record: &StatusRecord, _passed: Passed) -> Result<Step, Failure> {
        let file_id = record.file_id;
        match msg {
            // announced as completed before it is recorded: a file is completed only once its
            // subscribers can know it
            StageMessage::Processed(_) => {
                self.announce(NotificationKey::Completed, Notification::of(record, FileStatus::Completed)).await?;
                tracing::info!(%file_id, "completed");
                Ok(Step::Advance(FileStatus::Completed, StatusUpdate::default()))
            }
            // the status stays validation_failed: the rejection is the file's final word
            _ => {
                self.announce(NotificationKey::Rejected, Notification::of(record, record.status)).await?;
                tracing::info!(%file_id, "rejection announced");
                Ok(Step::Stay)
            }
        }
    }
}
