//! The map of the pipeline, in one table: for each worker stage, the routing key whose message
//! moves a file through it, what it only reports on, the statuses it moves a file through,
//! what it publishes, and (from those) its queue bindings, what a retry re-publishes and
//! which messages it admits. The worker loop, the topology, `txpipe retry`, the DLQ tooling
//! and the broker permissions all read this table instead of spelling a stage out again.
//!
//! The gateway is a [`Service`] but not a stage: it has no queue and moves no file.

use crate::status::{FileStatus, StatusRecord};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The routing keys of stage messages on `{ns}.pipeline`; each has one message type
/// ([`crate::messages::StageMessage`]) and one consuming stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoutingKey {
    /// The gateway stored an upload.
    FileUploaded,
    /// The validator found every row valid.
    FileValidated,
    /// The validator rejected the file for its contents.
    FileRejected,
    /// The transformer stored every row.
    FileProcessed,
}

impl RoutingKey {
    pub const ALL: [RoutingKey; 4] =
        [RoutingKey::FileUploaded, RoutingKey::FileValidated, RoutingKey::FileRejected, RoutingKey::FileProcessed];

    pub fn as_str(self) -> &'static str {
        match self {
            RoutingKey::FileUploaded => "file.uploaded",
            RoutingKey::FileValidated => "file.validated",
            RoutingKey::FileRejected => "file.rejected",
            RoutingKey::FileProcessed => "file.processed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The stage whose queue is bound to this key.
    pub fn consumer(self) -> Stage {
        Stage::ALL
            .into_iter()
            .find(|s| s.spec().inputs().any(|k| k == self))
            .expect("every routing key has a consuming stage in STAGES")
    }
}

impl fmt::Display for RoutingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The routing keys of notifications on `{ns}.notifications` (the seed's SNS topic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotificationKey {
    /// A file went through the whole pipeline.
    Completed,
    /// A file was rejected in validation.
    Rejected,
    /// A stage gave up on a file.
    Failed,
}

impl NotificationKey {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKey::Completed => "file.completed",
            NotificationKey::Rejected => "file.rejected",
            NotificationKey::Failed => "file.failed",
        }
    }
}

impl fmt::Display for NotificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker stage; its name is also its queue's suffix and its metrics' `stage` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Validator,
    Transformer,
    Notifier,
}

/// One row of the table: everything the shared plumbing needs to know about a stage.
#[derive(Debug)]
pub struct StageSpec {
    pub stage: Stage,
    /// The message that moves a file through this stage; also what `txpipe retry` publishes
    /// for a file that failed here.
    pub advances_on: RoutingKey,
    /// A message this stage only reports on, and the status the file must be in for it (the
    /// notifier announces rejections; the file's status stays as it is).
    pub observes: Option<(RoutingKey, FileStatus)>,
    /// The status a file is in when this stage's message is due.
    pub from: FileStatus,
    /// While the stage works on the file.
    pub working: FileStatus,
    /// When it is done.
    pub done: FileStatus,
    /// When it gave up (a failure, not a verdict on the contents).
    pub failed: FileStatus,
    /// The stage messages it publishes.
    pub publishes: &'static [RoutingKey],
    /// The notifications it publishes besides `file.failed`, which any stage may send.
    pub notifies: &'static [NotificationKey],
    /// Whether a fresh file is taken into the working status while the stage works on it (one
    /// attempt at a time, heartbeats, crashes counted). The notifier does without: its work is
    /// one confirmed publish that any copy may repeat (the same message id), so it moves a
    /// file from `processed` to `completed` in one write. The validator and the transformer
    /// do without for a file small enough to travel in its message (work done in memory in a
    /// moment; the history still shows the working status). A retry of a failed file, or a
    /// file left in the working status, is still claimed.
    pub holds_file: bool,
}

/// The pipeline, in order.
pub static STAGES: [StageSpec; 3] = [
    StageSpec {
        stage: Stage::Validator,
        advances_on: RoutingKey::FileUploaded,
        observes: None,
        from: FileStatus::Uploaded,
        working: FileStatus::Validating,
        done: FileStatus::Validated,
        failed: FileStatus::ValidationFailed,
        publishes: &[RoutingKey::FileValidated, RoutingKey::FileRejected],
        notifies: &[],
        holds_file: true,
    },
    StageSpec {
        stage: Stage::Transformer,
        advances_on: RoutingKey::FileValidated,
        observes: None,
        from: FileStatus::Validated,
        working: FileStatus::Processing,
        done: FileStatus::Processed,
        failed: FileStatus::ProcessingFailed,
        // file.rejected: a row conflicting with a transaction stored after validation
        publishes: &[RoutingKey::FileProcessed, RoutingKey::FileRejected],
        notifies: &[],
        holds_file: true,
    },
    StageSpec {
        stage: Stage::Notifier,
        advances_on: RoutingKey::FileProcessed,
        observes: Some((RoutingKey::FileRejected, FileStatus::ValidationFailed)),
        from: FileStatus::Processed,
        working: FileStatus::Notifying,
        done: FileStatus::Completed,
        failed: FileStatus::NotificationFailed,
        publishes: &[],
        notifies: &[NotificationKey::Completed, NotificationKey::Rejected],
        holds_file: false,
    },
];

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Validator, Stage::Transformer, Stage::Notifier];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Validator => "validator",
            Stage::Transformer => "transformer",
            Stage::Notifier => "notifier",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// This stage's row of [`STAGES`].
    pub fn spec(self) -> &'static StageSpec {
        let spec = &STAGES[self as usize];
        debug_assert_eq!(spec.stage, self);
        spec
    }

    /// The stage a file failed in, for a `*_failed` status.
    pub fn failed_in(status: FileStatus) -> Option<Stage> {
        Self::ALL.into_iter().find(|s| s.spec().failed == status)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a stage does with a message about a file, given where the file stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Move the file through the stage (from `from`, again from `working` after a crash, or
    /// from `failed` when a failed stage is retried).
    Work,
    /// Report on the file without moving it (an observed message).
    Observe,
    /// The file is already past this stage: pass on what it produced (a crash may have lost it;
    /// message ids make a copy harmless).
    PassOn,
    /// The message does not fit the file's status: it can never be handled.
    Refuse(String),
}

impl StageSpec {
    /// The routing keys this stage's queue is bound to.
    pub fn inputs(&self) -> impl Iterator<Item = RoutingKey> {
        std::iter::once(self.advances_on).chain(self.observes.map(|(k, _)| k))
    }

    /// Whether a failure handling a message on `key` is the file's failure in this stage
    /// (observed messages leave the status alone, failures included).
    pub fn tracks_status(&self, key: RoutingKey) -> bool {
        key == self.advances_on
    }

    /// What this stage does with a message on `key` about the file `record` describes.
    pub fn admit(&self, key: RoutingKey, record: &StatusRecord) -> Admission {
        let (file_id, status) = (record.file_id, record.status);
        if let Some((observed, wanted)) = self.observes.filter(|(k, _)| *k == key) {
            return if status == wanted {
                Admission::Observe
            } else {
                Admission::Refuse(format!("file {file_id} is {status}, not {wanted}: no {observed} to announce"))
            };
        }
        // a rejection is the validator's verdict, not a failure: it is passed on, never redone
        let retryable_failure = status == self.failed && !record.is_rejected();
        if status == self.from || status == self.working || retryable_failure {
            Admission::Work
        } else if status.is_at_or_past(self.done) || status.is_final() {
            Admission::PassOn
        } else {
            Admission::Refuse(format!(
                "file {file_id} is {status}, not {}: the {} cannot start on it",
                self.from, self.stage
            ))
        }
    }
}

/// A txpipe process kind: the gateway or one stage's worker (what it declares on the broker
/// and what it may do there follow from the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Gateway,
    Worker(Stage),
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Gateway,
        Service::Worker(Stage::Validator),
        Service::Worker(Stage::Transformer),
        Service::Worker(Stage::Notifier),
    ];

    /// The binary's and the compose service's short name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Worker(s) => s.as_str(),
        }
    }

    /// Where it serves HTTP unless `TXPIPE_HTTP_ADDR` says otherwise.
    pub fn default_http_addr(self) -> &'static str {
        match self {
            Service::Gateway => "127.0.0.1:8080",
            Service::Worker(Stage::Validator) => "127.0.0.1:9101",
            Service::Worker(Stage::Transformer) => "127.0.0.1:9102",
            Service::Worker(Stage::Notifier) => "127.0.0.1:9103",
        }
    }

    /// The stage messages it publishes.
    pub fn publishes(self) -> &'static [RoutingKey] {
        match self {
            Service::Gateway => &[RoutingKey::FileUploaded],
            Service::Worker(s) => s.spec().publishes,
        }
    }

    /// The events it hears on a queue of its own, exclusive to the process
    /// ([`crate::amqp::Broker::subscribe_own`], named `{ns}.gateway.{random}`): the gateway
    /// hears every verdict and final status, to answer uploads that wait for theirs
    /// (`Prefer: wait`). Stage messages on the pipeline exchange, then notifications.
    pub fn hears(self) -> (&'static [RoutingKey], &'static [NotificationKey]) {
        match self {
            Service::Gateway => (
                &[RoutingKey::FileValidated, RoutingKey::FileRejected],
                &[NotificationKey::Completed, NotificationKey::Rejected, NotificationKey::Failed],
            ),
            Service::Worker(_) => (&[], &[]),
        }
    }

    /// The stage queue it consumes, if any.
    pub fn consumes(self) -> Option<Stage> {
        match self {
            Service::Gateway => None,
            Service::Worker(s) => Some(s),
        }
    }

    /// The worker queues it declares: its own and those its messages go to, so a message
    /// published before the next stage ever started waits for it.
    pub fn declared_queues(self) -> Vec<Stage> {
        let mut queues: Vec<Stage> = self.consumes().into_iter().collect();
        for key in self.publishes() {
            if !queues.contains(&key.consumer()) {
                queues.push(key.consumer());
            }
        }
        queues
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file_id::FileId;

    #[test]
    fn every_routing_key_has_one_consumer() {
        assert_eq!(RoutingKey::FileUploaded.consumer(), Stage::Validator);
        assert_eq!(RoutingKey::FileValidated.consumer(), Stage::Transformer);
        assert_eq!(RoutingKey::FileRejected.consumer(), Stage::Notifier);
        assert_eq!(RoutingKey::FileProcessed.consumer(), Stage::Notifier);
        for k in RoutingKey::ALL {
            assert_eq!(RoutingKey::parse(k.as_str()), Some(k));
            let consumers = Stage::ALL.into_iter().filter(|s| s.spec().inputs().any(|i| i == k)).count();
            assert_eq!(consumers, 1, "{k}");
        }
        assert_eq!(RoutingKey::parse("other"), None);
    }

    #[test]
    fn the_table_is_in_stage_order_and_chains_statuses() {
        for (i, s) in Stage::ALL.into_iter().enumerate() {
            assert_eq!(STAGES[i].stage, s);
            assert_eq!(Stage::parse(s.as_str()), Some(s));
            assert_eq!(Stage::failed_in(s.spec().failed), Some(s));
            assert_eq!(s.spec().failed.retry_of(), Some(s.spec().working), "the retry edge restarts the stage");
            assert!(s.spec().working.is_working() && !s.spec().done.is_working());
        }
        for w in STAGES.windows(2) {
            assert_eq!(w[0].done, w[1].from, "{} hands over to {}", w[0].stage, w[1].stage);
        }
    }

    #[test]
    fn services_declare_their_queue_and_the_next() {
        assert_eq!(Service::Gateway.declared_queues(), [Stage::Validator]);
        // file.rejected goes to the notifier: a validator started alone must not find it unroutable
        assert_eq!(
            Service::Worker(Stage::Validator).declared_queues(),
            [Stage::Validator, Stage::Transformer, Stage::Notifier]
        );
        assert_eq!(Service::Worker(Stage::Transformer).declared_queues(), [Stage::Transformer, Stage::Notifier]);
        assert_eq!(Service::Worker(Stage::Notifier).declared_queues(), [Stage::Notifier]);
    }

    #[test]
    fn admission_follows_the_status() {
        use FileStatus::*;
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 1, chrono::Utc::now());
        let v = Stage::Validator.spec();
        let t = Stage::Transformer.spec();
        let n = Stage::Notifier.spec();
        let up = RoutingKey::FileUploaded;
        assert_eq!(v.admit(up, &r), Admission::Work);
        assert!(matches!(t.admit(RoutingKey::FileValidated, &r), Admission::Refuse(_)));
        r.status = ValidationFailed;
        assert_eq!(v.admit(up, &r), Admission::Work, "a failure is retried");
        assert_eq!(n.admit(RoutingKey::FileRejected, &r), Admission::Observe);
        r.error_count = Some(2);
        assert_eq!(v.admit(up, &r), Admission::PassOn, "a rejection is passed on, never redone");
        r.status = Processing;
        assert_eq!(v.admit(up, &r), Admission::PassOn);
        assert_eq!(t.admit(RoutingKey::FileValidated, &r), Admission::Work);
        assert!(matches!(n.admit(RoutingKey::FileRejected, &r), Admission::Refuse(_)));
        r.status = Completed;
        assert_eq!(n.admit(RoutingKey::FileProcessed, &r), Admission::PassOn);
    }
}
