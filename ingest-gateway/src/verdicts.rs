//! `Prefer: wait=N` on `POST /upload` (RFC 7240): the seed's synchronous verdict, as an option.
//! The gateway holds its answer until the validator has decided, at most N seconds (N is
//! clamped to [`MAX_WAIT_SECS`]; a preference is a hint, so a larger one is honoured as far as
//! it can be rather than refused): valid — 200 with the file's status record (the body
//! `GET /files/{id}` gives); invalid (`validation_failed`) — 422 with the same record (status,
//! `errors`, `error_count`); undecided when the time is up — the usual 202. With
//! `?until=completed` it waits for the file's final status instead: `completed`, or a stage's
//! `*_failed` (the request succeeded, the file did not: the record says why), 200;
//! `validation_failed`, 422. Every answer to an honoured wait says `Preference-Applied: wait=N`.
//!
//! No polling of storage: while uploads wait (and for [`IDLE_UNSUBSCRIBE`] after the last),
//! each gateway holds one exclusive, auto-deleted queue of its own (`{ns}.gateway.{random}`),
//! bound to the pipeline exchange's `file.validated` and
//! `file.rejected` and the notifications exchange's `file.completed`, `file.rejected` and
//! `file.failed` (`Service::hears`), so every replica hears every event; an event wakes the
//! uploads waiting for its file ([`Verdicts`], a map of file id to waiters), which read the
//! status and answer or wait again (an event may come a moment before the record it is
//! about, so a read that does not yet show it is followed by a few quick ones, 5 to 320 ms
//! apart). A waiter is registered *before* its first read (the
//! decision may predate it), and re-reads every [`FALLBACK_READ`] anyway, so an event lost
//! (a broker reconnect, a full queue, a gateway whose user may not subscribe) costs at most
//! that much delay. Nobody waiting, no queue: a gateway whose clients never wait costs the
//! broker nothing per file; the first wait after a quiet spell waits (up to
//! [`SUBSCRIBE_WAIT`]) for the subscription before its first read. A waiting upload keeps its upload slot (`TXPIPE_MAX_UPLOADS_IN_FLIGHT`), so
//! waits cannot pile up past the gateway's caps; at shutdown every wait answers at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use txpipe_common::stage::Service;
use txpipe_common::status::{FileStatus, StatusRecord};
use txpipe_common::{Deps, FileId};

/// The longest wait honoured, in seconds.
pub(crate) const MAX_WAIT_SECS: u64 = 60;
/// How often a waiting upload reads its status even without an event.
const FALLBACK_READ: Duration = Duration::from_secs(2);
/// After an event whose file the read does not yet show decided, the first of a few quick
/// reads (the pause doubles up to [`QUICK_READ_MAX`]): an event can come a moment before the
/// record it is about (the notifier announces `file.completed`, then records `completed`).
const QUICK_READ: Duration = Duration::from_millis(5);
const QUICK_READ_MAX: Duration = Duration::from_millis(320);
/// The pause before subscribing again after the subscription failed or ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// How long the subscription stays after the last wait ended.
const IDLE_UNSUBSCRIBE: Duration = Duration::from_secs(30);
/// How long a wait waits for the subscription before its first read.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(1);
/// The response header that says which preference was honoured.
pub(crate) const PREFERENCE_APPLIED: &str = "preference-applied";

/// What an upload that waits waits for (`?until=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Until {
    /// The validator's verdict (default).
    #[default]
    Validated,
    /// The file's final status.
    Completed,
}

impl Until {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "validated" => Some(Until::Validated),
            "completed" => Some(Until::Completed),
            _ => None,
        }
    }
}

/// The seconds of `Prefer: wait=N` (clamped to [`MAX_WAIT_SECS`]), if the request asks to
/// wait. Per RFC 7240 the first `wait` counts, preferences the gateway does not know and a
/// `wait` it cannot read are ignored, and `wait=0` is no wait.
pub(crate) fn wait_of(headers: &axum::http::HeaderMap) -> Option<u64> {
    for value in headers.get_all(axum::http::header::HeaderName::from_static("prefer")) {
        let Ok(value) = value.to_str() else { continue };
        for preference in value.split(',') {
            let token = preference.split(';').next().unwrap_or("");
            let Some((name, n)) = token.split_once('=') else { continue };
            if !name.trim().eq_ignore_ascii_case("wait") {
                continue;
            }
            let n = n.trim().trim_matches('"');
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // all digits: only overflow can fail, and that is more than the most anyway
            let secs = n.parse::<u64>().unwrap_or(u64::MAX).min(MAX_WAIT_SECS);
            return (secs > 0).then_some(secs);
        }
    }
    None
}

/// Whether the file's status answers a wait for `until`.
pub(crate) fn decided(record: &StatusRecord, until: Until) -> bool {
    record.status.is_final() || (until == Until::Validated && record.status.is_at_or_past(FileStatus::Validated))
}

/// The answer's status for a decided file: 422 for a rejected one, else 200.
pub(crate) fn status_code(record: &StatusRecord) -> axum::http::StatusCode {
    if record.status == FileStatus::ValidationFailed {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    } else {
        axum::http::StatusCode::OK
    }
}

/// The uploads of this gateway waiting for their files, by file id: each file's waiters share
/// a watch channel that an event about the file bumps.
#[derive(Clone, Default)]
pub(crate) struct Verdicts(Arc<Inner>);

struct Inner {
    waiting: Mutex<HashMap<FileId, (watch::Sender<()>, usize)>>,
    /// Cancelled at shutdown: every wait answers at once.
    stopping: CancellationToken,
    /// Bumped when a wait begins: the listener subscribes if it is not.
    wanted: tokio::sync::Notify,
    /// Whether the listener is subscribed now.
    subscribed: watch::Sender<bool>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            waiting: Mutex::default(),
            stopping: CancellationToken::new(),
            wanted: tokio::sync::Notify::new(),
            subscribed: watch::channel(false).0,
        }
    }
}

/// One waiting upload; unregisters itself when dropped.
struct Waiter {
    verdicts: Verdicts,
    file_id: FileId,
    events: watch::Receiver<()>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.verdicts.0.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, count)) = waiting.get_mut(&self.file_id) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(&self.file_id);
            }
        }
    }
}

impl Verdicts {
    fn register(&self, file_id: FileId) -> Waiter {
        let mut waiting = self.0.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, count) = waiting.entry(file_id).or_insert_with(|| (watch::channel(()).0, 0));
        *count += 1;
        Waiter { verdicts: self.clone(), file_id, events: tx.subscribe() }
    }

    /// An event about `file_id` arrived: its waiters read its status again.
    fn wake(&self, file_id: FileId) {
        let waiting = self.0.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tx, _)) = waiting.get(&file_id) {
            tx.send_replace(());
        }
    }

    /// True when no upload waits.
    fn idle(&self) -> bool {
        self.0.waiting.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Files with uploads waiting now (for tests and logs).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.0.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The gateway is stopping: every wait answers now.
    pub(crate) fn stop(&self) {
        self.0.stopping.cancel();
    }

    /// Waits up to `wait` for the file to be decided (see [`decided`]): its record then, or None
    /// when time is up, the gateway stops, or the file cannot be read (the usual 202 then).
    pub(crate) async fn wait_for(
        &self,
        deps: &Deps,
        file_id: FileId,
        until: Until,
        wait: Duration,
    ) -> Option<StatusRecord> {
        let deadline = tokio::time::Instant::now() + wait;
        // registered before the first read, so an event between the two is not missed
        let mut waiter = self.register(file_id);
        self.0.wanted.notify_one();
        let mut subscribed = self.0.subscribed.subscribe();
        let _ = tokio::time::timeout(SUBSCRIBE_WAIT.min(wait), subscribed.wait_for(|s| *s)).await;
        // the pause before the next quick read, after an event
        let mut quick: Option<Duration> = None;
        loop {
            let read = tokio::time::timeout_at(deadline, deps.storage.statuses.get(file_id)).await;
            match read {
                Ok(Ok(Some(record))) if decided(&record, until) => return Some(record),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let e = txpipe_common::error::Chain(&e);
                    tracing::debug!(%file_id, error = %e, "reading a waited-for status failed; waiting on");
                }
                Err(_) => return None,
            }
            let event = async {
                if waiter.events.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = event => quick = Some(QUICK_READ),
                _ = tokio::time::sleep(quick.unwrap_or(FALLBACK_READ)) => {
                    quick = quick.map(|d| d * 2).filter(|d| *d <= QUICK_READ_MAX);
                }
                _ = tokio::time::sleep_until(deadline) => return None,
                _ = self.0.stopping.cancelled() => return None,
            }
        }
    }
}

/// The file an event is about (every stage message and notification has `file_id`).
#[derive(serde::Deserialize)]
struct About {
    file_id: FileId,
}

/// Keeps this gateway subscribed to the events of [`Service::hears`] until `stop`, waking the
/// uploads waiting for each event's file. Subscribes again after a broker reconnect; while it
/// cannot (the broker is away, the gateway's user may not), waits fall back to reading every
/// [`FALLBACK_READ`].
pub(crate) async fn listen(deps: Deps, verdicts: Verdicts, stop: CancellationToken) {
    let names = &deps.names;
    let queue = format!("{}{}", names.gateway_queue_prefix(), uuid::Uuid::new_v4().simple());
    let (stage_keys, notification_keys) = Service::Gateway.hears();
    let bindings: Vec<(String, &str)> = stage_keys
        .iter()
        .map(|k| (names.pipeline_exchange(), k.as_str()))
        .chain(notification_keys.iter().map(|k| (names.notifications_exchange(), k.as_str())))
        .collect();
    let mut warned = false;
    loop {
        // subscribed only while someone waits
        if verdicts.idle() {
            tokio::select! {
                _ = verdicts.0.wanted.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
        let up = tokio::select! {
            up = deps.broker.wait_up() => up,
            _ = stop.cancelled() => return,
        };
        if up.is_err() {
            return; // the broker is given up: the gateway is stopping
        }
        let subscribed = tokio::select! {
            s = deps.broker.subscribe_own(&queue, &bindings) => s,
            _ = stop.cancelled() => return,
        };
        match subscribed {
            Ok(mut subscription) => {
                tracing::debug!(%queue, "hearing verdicts for waiting uploads");
                warned = false;
                verdicts.0.subscribed.send_replace(true);
                let mut quiet_since: Option<tokio::time::Instant> = None;
                // an interval, not a sleep per message: a busy pipeline must not keep it from firing
                let mut check = tokio::time::interval(IDLE_UNSUBSCRIBE / 4);
                loop {
                    let body = tokio::select! {
                        body = subscription.next() => body,
                        _ = check.tick() => {
                            // nobody has waited for a while: the queue goes until someone does
                            if !verdicts.idle() {
                                quiet_since = None;
                            } else if quiet_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= IDLE_UNSUBSCRIBE {
                                verdicts.0.subscribed.send_replace(false);
                                subscription.close().await;
                                tracing::debug!(%queue, "no upload waits: unsubscribed");
                                break;
                            }
                            continue;
                        }
                        _ = stop.cancelled() => {
                            verdicts.0.subscribed.send_replace(false);
                            subscription.close().await;
                            return;
                        }
                    };
                    let Some(body) = body else {
                        verdicts.0.subscribed.send_replace(false);
                        break;
                    };
                    if let Ok(about) = serde_json::from_slice::<About>(&body) {
                        verdicts.wake(about.file_id);
                    }
                }
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(%queue, error = %e,
                    "cannot subscribe to the pipeline's events: uploads waiting for their verdict (Prefer: wait) \
                     read their status every 2 s instead; check the gateway's RabbitMQ permissions (docs/operations.md)");
            }
            Err(e) => tracing::debug!(%queue, error = %e, "subscribing to the pipeline's events failed again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(values: &[&str]) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        for v in values {
            h.append("prefer", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn prefer_wait_is_read_as_rfc_7240_says() {
        assert_eq!(wait_of(&prefer(&[])), None);
        assert_eq!(wait_of(&prefer(&["wait=10"])), Some(10));
        assert_eq!(wait_of(&prefer(&["respond-async, WAIT = 5"])), Some(5));
        assert_eq!(wait_of(&prefer(&["return=minimal", "wait=\"7\"; foo=bar"])), Some(7));
        assert_eq!(wait_of(&prefer(&["wait=3, wait=9"])), Some(3), "the first one counts");
        assert_eq!(wait_of(&prefer(&["wait=600"])), Some(MAX_WAIT_SECS), "clamped");
        assert_eq!(wait_of(&prefer(&["wait=99999999999999999999999"])), Some(MAX_WAIT_SECS));
        for ignored in ["wait=0", "wait=-1", "wait=1.5", "wait=", "wait=abc", "waiting=5", "respond-async"] {
            assert_eq!(wait_of(&prefer(&[ignored])), None, "{ignored}");
        }
    }

    #[test]
    fn a_wait_is_decided_by_the_status() {
        use FileStatus::*;
        let mut r = StatusRecord::uploaded(FileId::new(), "k".into(), 1, chrono::Utc::now());
        for (status, validated, completed) in [
            (Uploaded, false, false),
            (Validating, false, false),
            (Validated, true, false),
            (ValidationFailed, true, true),
            (Processing, true, false),
            (ProcessingFailed, true, true),
            (Notifying, true, false),
            (Completed, true, true),
            (NotificationFailed, true, true),
        ] {
            r.status = status;
            assert_eq!(decided(&r, Until::Validated), validated, "{status}");
            assert_eq!(decided(&r, Until::Completed), completed, "{status}");
            let code = if status == ValidationFailed { 422 } else { 200 };
            assert_eq!(status_code(&r).as_u16(), code);
        }
    }

    #[tokio::test]
    async fn waiters_are_woken_by_their_file_and_unregister() {
        let v = Verdicts::default();
        let (a, b) = (FileId::new(), FileId::new());
        let mut wa = v.register(a);
        let wa2 = v.register(a);
        let mut wb = v.register(b);
        assert_eq!(v.waiting(), 2);
        v.wake(a);
        assert!(wa.events.has_changed().unwrap());
        assert!(!wb.events.has_changed().unwrap());
        wa.events.changed().await.unwrap();
        v.wake(FileId::new()); // nobody waits: nothing happens
        drop((wa, wa2));
        assert_eq!(v.waiting(), 1);
        v.wake(b);
        wb.events.changed().await.unwrap();
        drop(wb);
        assert_eq!(v.waiting(), 0);
    }
}
