//! The stuck-file sweep: every worker looks, every quarter of `TXPIPE_STUCK_AFTER_MS`, for files
//! in its own stage's working status whose attempt has shown no sign of life for that long, and
//! resumes them by publishing the stage's message again.
//!
//! Why it is needed: an attempt that cannot record its outcome leaves the file in its working
//! status with no message left to move it (its worker killed after the broker lost the
//! message too, or storage down for longer than every retry, so that even recording the
//! failure failed and the message went to the DLQ). Resuming, not failing, because the file
//! may still have a message on its way (a redelivery) that would then start it again after
//! `file.failed` was sent; a resumed message is a copy like any other, so whichever comes
//! first takes the file over ([`crate::attempt`]) and the other passes on.
//!
//! Cheap and safe with replicas: the query reads only the stage's files in flight (SQLite's
//! partial index, DynamoDB's sparse `working-index`), and each file is first marked swept
//! with a conditional write, so of several sweepers only one publishes it per period.

use crate::amqp::Publisher;
use crate::attempt::Lease;
use crate::messages::StageMessage;
use crate::metrics::{FileResumed, InternalEvent};
use crate::stage::StageSpec;
use crate::storage::{Advance, StorageError, StorageErrorKind};
use crate::Deps;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Files looked at per sweep; the rest wait for the next one.
const BATCH: usize = 100;

/// Sweeps `spec`'s working status until `stop` resolves.
pub async fn run(deps: Deps, spec: &'static StageSpec, publisher: Publisher, stop: impl Future<Output = ()>) {
    let after = Duration::from_millis(deps.settings.stuck_after_ms);
    let every = (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sweep(&deps, spec, &publisher, after).await {
            tracing::warn!(stage = %spec.stage, error = %crate::error::Chain(&e), "sweeping stuck files failed; trying again later");
        }
    }
}

/// One sweep: resumes the files of `spec`'s working status with no sign of life for `after`;
/// returns how many.
pub async fn sweep(
    deps: &Deps,
    spec: &'static StageSpec,
    publisher: &Publisher,
    after: Duration,
) -> Result<usize, StorageError> {
    let now = chrono::Utc::now();
    let stale_before = now - chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
    let lease = Lease {
        spec,
        id: "sweep".into(),
        now,
        stale_before,
        alone: false,
        crash_limit: deps.settings.delivery_limit,
        may_retry: false,
    };
    let mut resumed = 0;
    for file_id in deps.storage.statuses.stalled(spec.working, stale_before, BATCH).await? {
        let l = lease.clone();
        let record = match deps.storage.statuses.update(file_id, Arc::new(move |r| l.sweep(r))).await {
            Ok(Advance::Moved(r)) => r,
            // moved on, came alive, or another sweeper got there first
            Ok(Advance::Refused(_)) => continue,
            Err(e) if e.kind() == StorageErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut msg = StageMessage::from_record(spec.advances_on, &record).outgoing(&deps.names);
        // a resume, not a retry: if the file failed meanwhile, the copy leaves it failed
        msg.headers.push((crate::dead_letter::header::RESUMED.into(), "1".into()));
        if let Err(e) = publisher.publish(&msg).await {
            // marked swept but not resumed: it is stale again after `after`, and swept again
            tracing::warn!(stage = %spec.stage, %file_id, error = %e, "cannot resume a stuck file now; trying again later");
            continue;
        }
        FileResumed { stage: spec.stage, file_id, status: record.status }.emit();
        resumed += 1;
    }
    Ok(resumed)
}
