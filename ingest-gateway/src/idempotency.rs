//! `Idempotency-Key` on `POST /upload` (the IETF httpapi draft's header): a client that sends
//! the same key again — a retry after a timeout, a lost answer — gets the first upload's answer
//! (the same `file_id`), and nothing is stored or announced twice, whichever gateway replica the
//! repeat reaches.
//!
//! - The record lives in the table store ([`IdempotencyStore`]), keyed by the API key's name and
//!   the SHA-256 of the idempotency key (never the raw key: a record names no tenant's secret,
//!   and keys of different API keys never meet). It is kept [`KEEP`] (24 hours) from the first
//!   request.
//! - The first request *claims* the key (one conditional write) before its body is read. A
//!   repeat while it is in flight gets 409 `idempotency_key_in_use` at once (with
//!   `Retry-After`), as the draft says; once it is done, the repeat's body is read (through
//!   the same limits, but into nothing: it is only hashed) and compared with the first's
//!   SHA-256 and options: the same — the first answer again (with `Idempotent-Replayed: true`);
//!   different — 422 `idempotency_key_reused`.
//! - The claim is completed, with the upload, in the same task that commits the upload, which
//!   a client hanging up cannot cancel; an upload that fails (or is abandoned before it is
//!   committed) releases the key, so a retry with it starts afresh. The claim's lease
//!   ([`LEASE`]) is renewed every [`RENEW_EVERY`] while the upload runs, however long its body
//!   takes; a claim whose gateway died holds the key until its lease runs out, then the next
//!   request takes it over.
//! - A repeat is not counted against the daily quota: nothing is stored for it.

use crate::GatewayError;
use axum::http::HeaderMap;
use chrono::Utc;
use std::sync::Arc;
use txpipe_common::storage::{Claim, IdempotencyStore, IdempotentUpload, NewClaim};

/// The request header.
pub(crate) const HEADER: &str = "idempotency-key";
/// The response header that marks an answer given again for a repeated key.
pub(crate) const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The longest key accepted (a UUID is 36; Stripe takes 255 too).
pub(crate) const MAX_KEY_CHARS: usize = 255;
/// How long a key's record is kept, from its first request.
pub(crate) const KEEP: chrono::Duration = chrono::Duration::hours(24);
/// How long an unfinished claim holds its key without being renewed: a gateway that died
/// mid-upload blocks the key (409) this long at most.
pub(crate) const LEASE: chrono::Duration = chrono::Duration::minutes(2);
/// How often a live upload renews its claim: a few renewals fit in a lease, so one slow or
/// failed storage call does not lose it.
pub(crate) const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The request's `Idempotency-Key`, if it sent one: 1 to [`MAX_KEY_CHARS`] visible ASCII
/// characters, as a bare token or as the draft's quoted string (`"…"`, no escapes inside).
/// Anything else — empty, too long, spaces, control or non-ASCII bytes, the header twice — is a
/// 400.
pub(crate) fn key_of(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    let bad = |why: &str| {
        GatewayError::BadRequest(format!(
            "Idempotency-Key {why}: send one key of 1 to {MAX_KEY_CHARS} visible ASCII characters (a UUID, say)"
        ))
    };
    if values.next().is_some() {
        return Err(bad("was sent more than once"));
    }
    let raw = value.as_bytes();
    let inner = match raw {
        [b'"', inner @ .., b'"'] => inner,
        _ => raw,
    };
    if inner.is_empty() {
        return Err(bad("is empty"));
    }
    if inner.len() > MAX_KEY_CHARS {
        return Err(bad("is too long"));
    }
    if !inner.iter().all(|b| (0x21..=0x7e).contains(b) && *b != b'"' && *b != b'\\') {
        return Err(bad("holds characters other than visible ASCII"));
    }
    // checked above: every byte is ASCII
    Ok(Some(String::from_utf8_lossy(inner).into_owned()))
}

/// The record's key: the API key's name (empty with auth off) and the SHA-256 of the
/// idempotency key. The hash is fixed-length and last, so no two (name, key) pairs meet.
pub(crate) fn record_key(owner: Option<&str>, key: &str) -> String {
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
    format!("{}#{hash}", owner.unwrap_or(""))
}

/// What the first request with a key found.
pub(crate) enum Found {
    /// This request holds the key: it uploads, and completes the claim with its upload.
    Claimed(Held),
    /// The key's upload is done: a repeat.
    Done(IdempotentUpload),
}

/// Claims `key` (a [`record_key`]) for this request, or says whose it is; 409 while another
/// request holds it.
pub(crate) async fn claim(store: &Arc<dyn IdempotencyStore>, key: String) -> Result<Found, GatewayError> {
    let now = Utc::now();
    let token = uuid::Uuid::new_v4().simple().to_string();
    let claim =
        NewClaim { key: key.clone(), token: token.clone(), now, lease_until: now + LEASE, expires_at: now + KEEP };
    match store.claim(&claim).await.map_err(|e| GatewayError::from_storage("claiming the Idempotency-Key", e))? {
        Claim::Claimed => {
            let renewing = tokio_util::sync::CancellationToken::new();
            tokio::spawn(renew(store.clone(), key.clone(), token.clone(), RENEW_EVERY, renewing.clone()));
            Ok(Found::Claimed(Held { store: store.clone(), key, token, settled: false, renewing }))
        }
        Claim::InFlight => Err(GatewayError::IdempotencyInFlight),
        Claim::Done(upload) => Ok(Found::Done(upload)),
    }
}

/// Renews the claim `every` so often ([`RENEW_EVERY`]) until `stop` (the claim completed or
/// released) or until the claim is no longer this token's.
async fn renew(
    store: Arc<dyn IdempotencyStore>,
    key: String,
    token: String,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        match store.renew(&key, &token, Utc::now() + LEASE).await {
            Ok(true) => {}
            Ok(false) => return,
            // the next round may get through; the lease outlasts a few failed ones
            Err(e) => {
                tracing::debug!(error = %txpipe_common::error::Chain(&e), "renewing an Idempotency-Key's claim failed")
            }
        }
    }
}

/// A key this request holds, its claim renewed while it lives. Completed with the upload once
/// it is committed; released if it is dropped before that (the upload failed, or the request
/// was abandoned before its commit), from a task of its own, so a retry with the key is not
/// refused until the lease runs out.
pub(crate) struct Held {
    store: Arc<dyn IdempotencyStore>,
    key: String,
    token: String,
    settled: bool,
    renewing: tokio_util::sync::CancellationToken,
}

impl Held {
    /// Records the committed upload as the key's answer. If that fails the upload still stands
    /// (it is stored and announced): the key stays claimed until its lease runs out, and a
    /// repeat meanwhile gets 409.
    pub(crate) async fn complete(mut self, upload: &IdempotentUpload) {
        self.settled = true;
        self.renewing.cancel();
        match self.store.complete(&self.key, &self.token, upload).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(file_id = %upload.file_id, "the Idempotency-Key's claim was taken over before the upload finished")
            }
            Err(e) => {
                let e = txpipe_common::error::Chain(&e);
                tracing::warn!(file_id = %upload.file_id, error = %e, "could not record the upload under its Idempotency-Key");
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewing.cancel();
        if self.settled {
            return;
        }
        let (store, key, token) = (self.store.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release(&key, &token).await {
                    let e = txpipe_common::error::Chain(&e);
                    tracing::warn!(error = %e, "could not release an Idempotency-Key after a failed upload");
                }
            });
        }
    }
}

/// Why a repeat is not the first request, if it is not: its file or its options differ.
pub(crate) fn mismatch(
    first: &IdempotentUpload,
    sha256: &str,
    options: txpipe_common::status::UploadOptions,
) -> Option<String> {
    if first.sha256 != sha256 {
        Some(format!(
            "this Idempotency-Key was used within {} hours for another file (SHA-256 {}, this one's {sha256}): use a new key for a new upload",
            KEEP.num_hours(),
            first.sha256
        ))
    } else if first.options != options {
        Some(format!(
            "this Idempotency-Key was used within {} hours for the same file with other options (mode {}, on_conflict {}): use a new key for a new upload",
            KEEP.num_hours(),
            first.options.mode.as_str(),
            first.options.on_conflict.as_str()
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, axum::http::HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert_eq!(key_of(&headers(&[])).unwrap(), None);
        assert_eq!(key_of(&headers(&[b"abc-123"])).unwrap().as_deref(), Some("abc-123"));
        assert_eq!(key_of(&headers(&[b"\"8e03978e\""])).unwrap().as_deref(), Some("8e03978e"), "the draft's sf-string");
        let longest = "k".repeat(MAX_KEY_CHARS);
        assert_eq!(key_of(&headers(&[longest.as_bytes()])).unwrap(), Some(longest.clone()));
        let too_long = longest + "k";
        for bad in [&b""[..], b"\"\"", b"a b", b"a\tb", "é".as_bytes(), b"\xff", too_long.as_bytes(), b"a\"b"] {
            let err = key_of(&headers(&[bad])).unwrap_err();
            assert_eq!(err.code(), "bad_request", "{bad:?}");
        }
        assert_eq!(key_of(&headers(&[b"a", b"b"])).unwrap_err().code(), "bad_request", "twice");
    }

    /// A store that counts renewals and says the claim is lost after `keep` of them.
    struct Counting {
        renewed: std::sync::atomic::AtomicUsize,
        keep: usize,
    }

    #[async_trait::async_trait]
    impl IdempotencyStore for Counting {
        async fn claim(&self, _: &NewClaim) -> Result<Claim, txpipe_common::storage::StorageError> {
            Ok(Claim::Claimed)
        }
        async fn renew(
            &self,
            _: &str,
            _: &str,
            until: chrono::DateTime<Utc>,
        ) -> Result<bool, txpipe_common::storage::StorageError> {
            assert!(until > Utc::now() + LEASE - chrono::Duration::seconds(5), "a whole lease from now");
            let n = self.renewed.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Ok(n < self.keep)
        }
        async fn complete(
            &self,
            _: &str,
            _: &str,
            _: &IdempotentUpload,
        ) -> Result<bool, txpipe_common::storage::StorageError> {
            Ok(true)
        }
        async fn release(&self, _: &str, _: &str) -> Result<(), txpipe_common::storage::StorageError> {
            Ok(())
        }
        async fn check(&self) -> Result<(), txpipe_common::storage::StorageError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_claim_is_renewed_while_held_and_no_longer_once_lost_or_settled() {
        use std::sync::atomic::Ordering::SeqCst;
        let every = std::time::Duration::from_millis(10);
        let store = Arc::new(Counting { renewed: Default::default(), keep: usize::MAX });
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(renew(store.clone(), "k".into(), "t".into(), every, stop.clone()));
        tokio::time::sleep(every * 10).await;
        assert!(store.renewed.load(SeqCst) >= 3, "renewed while held");
        stop.cancel();
        task.await.unwrap();
        let after = store.renewed.load(SeqCst);
        tokio::time::sleep(every * 5).await;
        assert_eq!(store.renewed.load(SeqCst), after, "not once settled");

        // a claim taken over (renew says false) stops renewing by itself
        let lost = Arc::new(Counting { renewed: Default::default(), keep: 2 });
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(renew(lost.clone(), "k".into(), "t".into(), every, stop));
        tokio::time::timeout(every * 50, task).await.expect("stops once lost").unwrap();
        assert_eq!(lost.renewed.load(SeqCst), 2);
    }

    #[test]
    fn records_are_keyed_by_owner_and_a_hash_of_the_key() {
        let a = record_key(Some("alice"), "k1");
        assert!(a.starts_with("alice#") && !a.contains("k1") && a.len() == "alice#".len() + 64, "{a}");
        assert_ne!(a, record_key(Some("bob"), "k1"));
        assert_ne!(a, record_key(Some("alice"), "k2"));
        assert_eq!(a, record_key(Some("alice"), "k1"));
    }
}
