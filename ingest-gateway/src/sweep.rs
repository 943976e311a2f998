//! The sweeper of unannounced uploads. An upload is recorded, then announced; a gateway that
//! crashes between the two leaves a record no worker will ever pick up. Every gateway looks
//! for records unannounced for longer than `TXPIPE_UNANNOUNCED_SWEEP_AFTER_MS` and withdraws
//! them (only while still unannounced, atomically, so a late announcement wins or the
//! withdrawal does), then removes their objects. Their clients were never answered 202, so
//! nobody is told; several gateways sweeping at once is harmless.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use txpipe_common::Deps;

/// Records looked at per sweep; the rest wait for the next one.
const BATCH: usize = 100;

/// Sweeps every quarter of the age limit (at most a minute apart) until `stop`.
pub(crate) async fn run(deps: Deps, stop: CancellationToken) {
    let after = Duration::from_millis(deps.settings.unannounced_sweep_after_ms);
    let every = (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sweep(&deps, after).await {
            tracing::warn!(error = %txpipe_common::error::Chain(&e), "sweeping unannounced uploads failed; trying again later");
        }
    }
}

/// One sweep: withdraws what is old enough; returns how many were withdrawn.
pub(crate) async fn sweep(deps: &Deps, after: Duration) -> Result<usize, txpipe_common::storage::StorageError> {
    let age = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
    let before = chrono::Utc::now() - age;
    let mut withdrawn = 0;
    for file_id in deps.storage.statuses.unannounced(before, BATCH).await? {
        // withdraw first: an object is removed only once its record can no longer be announced
        if deps.storage.statuses.withdraw(file_id).await? {
            deps.storage.objects.delete(&deps.names.object_key(&file_id)).await?;
            tracing::warn!(%file_id, "withdrew an upload that was recorded but never announced");
            withdrawn += 1;
        }
    }
    Ok(withdrawn)
}
