//! The attempt that works on a file in a stage's working status: a lease with a heartbeat and
//! a crash count, kept in the file's status record ([`Attempt`]) so every replica sees it.
//!
//! Why in the record and not in the broker:
//! - two copies of one stage message (a redelivery while the first still runs, a duplicate
//!   publish) must never work on a file at once, or one copy's failure could mark failed a
//!   file the other completes: a copy that finds a live attempt waits for it;
//! - only the attempt that holds the working status may record the file failed;
//! - crashes are counted per file, not by the broker's `x-delivery-count`: from RabbitMQ 4.3 a
//!   requeueing nack no longer counts, and a worker that dies returns every message it had
//!   prefetched, not only the one that killed it. An attempt found dead makes the file a
//!   *suspect*, whose next attempt runs alone in its worker; only a crash while running alone
//!   (or a caught panic, which names its file) counts, so innocent neighbours are never pushed
//!   towards `TXPIPE_DELIVERY_LIMIT`;
//! - a file whose attempt died without recording anything (its worker killed, or storage down
//!   when it tried to record its failure) is found by the stuck-file sweep
//!   (`crate::stuck`), which resumes it.
//!
//! Each rule below is one change applied atomically by `StatusStore::update`, so it holds
//! across replicas; they are pure functions of the record, tested here without storage.

use crate::stage::StageSpec;
use crate::status::{Attempt, StatusRecord, StatusUpdate};
use chrono::{DateTime, Utc};

/// What a claim found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The file is in the stage's working status, held by this attempt.
    Claimed,
    /// Another attempt is live on the file: wait for it.
    Busy,
    /// An earlier attempt died on the file: claim again while running alone.
    NeedsAlone,
    /// Attempts crashed on the file `TXPIPE_DELIVERY_LIMIT` times: it was moved to the stage's
    /// failed status instead.
    Poisoned,
    /// The file is not (or no longer) one this stage may start on.
    Moved,
}

impl Claim {
    /// Whether the record was changed (and so must be written).
    pub fn changed(self) -> bool {
        matches!(self, Claim::Claimed | Claim::Poisoned)
    }
}

/// One attempt's view of the lease rules: who it is and what time it is.
#[derive(Clone, Debug)]
pub struct Lease {
    pub spec: &'static StageSpec,
    /// This attempt's id (one per delivery handled).
    pub id: String,
    pub now: DateTime<Utc>,
    /// A live attempt whose last heartbeat is older than this is dead (`TXPIPE_STUCK_AFTER_MS`).
    pub stale_before: DateTime<Utc>,
    /// This attempt runs alone in its worker.
    pub alone: bool,
    /// Crashes after which the file fails (`TXPIPE_DELIVERY_LIMIT`).
    pub crash_limit: u32,
    /// Whether a failed file may be started again (the retry edge). False for a copy that
    /// waited for another attempt: if that attempt failed the file, this copy is its duplicate,
    /// not a retry.
    pub may_retry: bool,
}

impl Lease {
    fn mine(&self, r: &StatusRecord) -> bool {
        r.status == self.spec.working && r.attempt.as_ref().is_some_and(|a| a.id == self.id)
    }

    fn live_other(&self, r: &StatusRecord) -> bool {
        r.status == self.spec.working
            && r.attempt.as_ref().is_some_and(|a| a.id != self.id && a.live && a.renewed_at >= self.stale_before)
    }

    /// Takes the file into the stage's working status for this attempt (from the status before
    /// the stage, from the failed status when retrying, or over a dead attempt).
    pub fn claim(&self, r: &mut StatusRecord) -> Claim {
        let spec = self.spec;
        if self.mine(r) {
            // the same delivery trying again after a transient failure
            if let Some(a) = r.attempt.as_mut() {
                a.renewed_at = self.now;
                a.live = true;
            }
            return Claim::Claimed;
        }
        if self.live_other(r) {
            return Claim::Busy;
        }
        if r.status == spec.working {
            // no attempt (a record from before attempts were kept), or a dead or ended one
            let prev = r.attempt.take();
            let mut next = prev.clone().unwrap_or_else(|| self.fresh(0));
            if let Some(p) = &prev {
                if p.live {
                    bury(&mut next);
                }
            }
            if next.crashes >= self.crash_limit {
                let reason = format!(
                    "{}: delivery_limit: its worker crashed {} time(s) on this file (TXPIPE_DELIVERY_LIMIT is {}); \
                     fix the cause, then `txpipe retry` it",
                    spec.stage, next.crashes, self.crash_limit
                );
                let update = StatusUpdate { reason: Some(reason), ..Default::default() };
                r.advance(spec.failed, update, self.now);
                return Claim::Poisoned;
            }
            if next.suspect && !self.alone {
                r.attempt = prev;
                return Claim::NeedsAlone;
            }
            r.attempt = Some(Attempt {
                id: self.id.clone(),
                started: next.started + 1,
                renewed_at: self.now,
                live: true,
                alone: self.alone,
                ..next
            });
            return Claim::Claimed;
        }
        let retry = self.may_retry && r.status == spec.failed && !r.is_rejected();
        if (r.status == spec.from || retry) && r.advance(spec.working, StatusUpdate::default(), self.now) {
            r.attempt = Some(self.fresh(1));
            // a stage holding the file's message is proof it was announced: the gateway can no
            // longer withdraw it (see the validator), and it need not wait for the gateway's mark
            r.announced = true;
            return Claim::Claimed;
        }
        Claim::Moved
    }

    fn fresh(&self, started: u32) -> Attempt {
        Attempt {
            id: self.id.clone(),
            started,
            crashes: 0,
            renewed_at: self.now,
            live: true,
            alone: self.alone,
            suspect: false,
        }
    }

    /// The heartbeat; false when the file is no longer this attempt's.
    pub fn renew(&self, r: &mut StatusRecord) -> bool {
        match r.attempt.as_mut() {
            Some(a) if r.status == self.spec.working && a.id == self.id && a.live => {
                a.renewed_at = self.now;
                true
            }
            _ => false,
        }
    }

    /// Ends this attempt without an outcome, so another copy may start at once: after a crash
    /// caught in the worker (counted: the crash is this file's), or when the broker link was
    /// lost under it (not counted).
    pub fn release(&self, r: &mut StatusRecord, crashed: bool) -> bool {
        if !self.mine(r) {
            return false;
        }
        let Some(a) = r.attempt.as_mut() else { return false };
        a.live = false;
        a.renewed_at = self.now;
        if crashed {
            a.crashes += 1;
            a.suspect = true;
        }
        true
    }

    /// Records the stage's failure, unless another attempt is live on the file (then that
    /// attempt decides how the file ends).
    pub fn fail(&self, r: &mut StatusRecord, update: StatusUpdate) -> bool {
        !self.live_other(r) && r.advance(self.spec.failed, update, self.now)
    }

    /// The stuck-file sweep: ends the attempt of a file that has shown no sign of life since
    /// `stale_before` (a live one is buried: it died), so the message the sweep publishes
    /// next takes over at once. False if the file moved or came alive meanwhile.
    pub fn sweep(&self, r: &mut StatusRecord) -> bool {
        if r.status != self.spec.working || r.last_sign_of_life() >= self.stale_before {
            return false;
        }
        let mut a = r.attempt.take().unwrap_or_else(|| Attempt { live: false, ..self.fresh(0) });
        if a.live {
            bury(&mut a);
        }
        a.live = false;
        a.renewed_at = self.now;
        r.attempt = Some(a);
        true
    }
}

/// What finding a live attempt dead means: the file is a suspect, and if the attempt ran alone
/// its crash was the file's own.
fn bury(a: &mut Attempt) {
    a.suspect = true;
    if a.alone {
        a.crashes += 1;
    }
    a.live = false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file_id::FileId;
    use crate::stage::Stage;
    use crate::status::FileStatus::*;
    use chrono::Duration;

    fn lease(id: &str, now: DateTime<Utc>) -> Lease {
        Lease {
            spec: Stage::Transformer.spec(),
            id: id.into(),
            now,
            stale_before: now - Duration::seconds(60),
            alone: false,
            crash_limit: 2,
            may_retry: true,
        }
    }

    fn validated(at: DateTime<Utc>) -> StatusRecord {
        let mut r = StatusRecord::uploaded(FileId::new(), "uploads/x.csv".into(), 1, at);
        assert!(r.advance(Validated, StatusUpdate::default(), at));
        r
    }

    #[test]
    fn one_live_attempt_at_a_time_and_only_it_records_a_failure() {
        let t0 = Utc::now();
        let mut r = validated(t0);
        let (a, b) = (lease("a", t0), lease("b", t0));
        assert_eq!(a.claim(&mut r), Claim::Claimed);
        assert_eq!((r.status, r.attempt.as_ref().unwrap().started), (Processing, 1));
        assert_eq!(b.claim(&mut r), Claim::Busy, "a duplicate waits for the live attempt");
        assert!(!b.fail(&mut r, StatusUpdate::default()), "and may not fail the file under it");
        assert!(!b.renew(&mut r));
        assert_eq!(a.claim(&mut r), Claim::Claimed, "the same delivery may try again");
        assert!(a.renew(&mut r));
        // a finished file is not failed by a late copy
        assert!(r.advance(Processed, StatusUpdate::default(), t0));
        assert_eq!(r.attempt, None, "a status change ends the attempt");
        assert!(!b.fail(&mut r, StatusUpdate::default()));
        assert_eq!(b.claim(&mut r), Claim::Moved);
    }

    #[test]
    fn a_copy_that_waited_does_not_retry_what_the_live_attempt_failed() {
        let t0 = Utc::now();
        let mut r = validated(t0);
        assert_eq!(lease("a", t0).claim(&mut r), Claim::Claimed);
        assert!(lease("a", t0).fail(&mut r, StatusUpdate::default()));
        assert_eq!(r.status, ProcessingFailed);
        let waited = Lease { may_retry: false, ..lease("b", t0) };
        assert_eq!(waited.claim(&mut r), Claim::Moved);
        assert_eq!(lease("retry", t0).claim(&mut r), Claim::Claimed, "a retry restarts the stage");
        assert_eq!(r.attempt.as_ref().unwrap().crashes, 0);
    }

    #[test]
    fn a_dead_attempt_is_taken_over_by_a_suspect_running_alone() {
        let t0 = Utc::now();
        let mut r = validated(t0);
        assert_eq!(lease("a", t0).claim(&mut r), Claim::Claimed);
        let later = t0 + Duration::seconds(61);
        assert_eq!(lease("b", later).claim(&mut r), Claim::NeedsAlone, "a stale heartbeat: a's worker died");
        assert!(r.attempt.as_ref().unwrap().live, "nothing changes until claimed alone");
        let alone = Lease { alone: true, ..lease("b", later) };
        assert_eq!(alone.claim(&mut r), Claim::Claimed);
        let at = r.attempt.clone().unwrap();
        assert_eq!((at.started, at.crashes, at.suspect, at.alone), (2, 0, true, true), "a was not alone: no crash");
        // b dies too, alone: that crash is the file's
        let later = later + Duration::seconds(61);
        let c = Lease { alone: true, ..lease("c", later) };
        assert_eq!(c.claim(&mut r), Claim::Claimed);
        assert_eq!(r.attempt.as_ref().unwrap().crashes, 1);
        // c panics (caught): counted, released at once, so d need not wait
        assert!(c.release(&mut r, true));
        let d = Lease { alone: true, ..lease("d", later) };
        assert_eq!(d.claim(&mut r), Claim::Poisoned, "two crashes reach the limit of 2");
        assert_eq!(r.status, ProcessingFailed);
        assert!(r.reason.as_deref().unwrap().contains("delivery_limit"));
    }

    #[test]
    fn a_released_attempt_is_taken_over_at_once_without_a_count() {
        let t0 = Utc::now();
        let mut r = validated(t0);
        let a = lease("a", t0);
        assert_eq!(a.claim(&mut r), Claim::Claimed);
        assert!(a.release(&mut r, false));
        assert_eq!(lease("b", t0).claim(&mut r), Claim::Claimed);
        let at = r.attempt.unwrap();
        assert_eq!((at.started, at.crashes, at.suspect), (2, 0, false));
    }

    #[test]
    fn the_sweep_ends_only_attempts_without_a_sign_of_life() {
        let t0 = Utc::now();
        let mut r = validated(t0);
        assert_eq!(lease("a", t0).claim(&mut r), Claim::Claimed);
        assert!(!lease("sweep", t0).sweep(&mut r), "fresh heartbeat: alive");
        let later = t0 + Duration::seconds(61);
        assert!(lease("sweep", later).sweep(&mut r));
        let at = r.attempt.clone().unwrap();
        assert_eq!((at.live, at.suspect, at.renewed_at), (false, true, later));
        assert!(!lease("sweep", later).sweep(&mut r), "swept: not again until stale once more");
        assert_eq!(lease("b", later).claim(&mut r), Claim::NeedsAlone);
        // a file in no working status is never swept
        let mut done = validated(t0);
        assert!(!lease("sweep", later).sweep(&mut done));
    }
}
