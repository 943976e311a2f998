//! Usage plans, as API Gateway has them: per key, a request rate with a burst (a token bucket
//! held by this gateway replica) and a daily upload quota (counted in the table store, so all
//! replicas share one count).
//!
//! Headers: every keyed answer carries `X-RateLimit-Limit` (the burst), `X-RateLimit-Remaining`
//! (whole tokens left) and `X-RateLimit-Reset` (seconds until the bucket is full again); an
//! accepted upload's answer and a `quota_exceeded` refusal also carry `X-Quota-Limit`,
//! `X-Quota-Remaining` and `X-Quota-Reset` (seconds until the next UTC midnight). A 429 adds
//! `Retry-After` in seconds.
//!
//! The quota is counted before the body is read, so an upload over quota costs nothing, and
//! given back if the upload then fails or is abandoned: only accepted uploads stay counted.

use crate::GatewayError;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{NaiveDate, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use txpipe_common::auth::Caller;
use txpipe_common::storage::QuotaUse;
use txpipe_common::Deps;

/// One limit's state, as the client sees it in the response headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// `X-RateLimit` or `X-Quota`.
    pub prefix: &'static str,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the limit is whole again.
    pub reset: u64,
}

impl Limit {
    /// Writes `{prefix}-Limit`, `{prefix}-Remaining` and `{prefix}-Reset`.
    pub fn write(&self, headers: &mut HeaderMap) {
        for (name, value) in [("Limit", self.limit), ("Remaining", self.remaining), ("Reset", self.reset)] {
            if let Ok(name) = axum::http::HeaderName::try_from(format!("{}-{name}", self.prefix)) {
                headers.insert(name, HeaderValue::from(value));
            }
        }
    }
}

/// A key's token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The token buckets of this replica, one per key name.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes a token from `name`'s bucket (refilled at `rate` a second up to `burst`): Ok with
    /// what is left, or Err with when to try again.
    fn take(&self, name: &str, rate: f64, burst: u32, now: Instant) -> Result<Limit, (Limit, u64)> {
        let burst_f = f64::from(burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(name.to_owned()).or_insert(Bucket { tokens: burst_f, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst_f);
        b.at = now;
        let allowed = b.tokens >= 1.0;
        if allowed {
            b.tokens -= 1.0;
        }
        let limit = Limit {
            prefix: "X-RateLimit",
            limit: u64::from(burst),
            remaining: b.tokens.floor() as u64,
            reset: ((burst_f - b.tokens) / rate).ceil() as u64,
        };
        if allowed {
            Ok(limit)
        } else {
            Err((limit, ((1.0 - b.tokens) / rate).ceil().max(1.0) as u64))
        }
    }
}

/// Middleware after authentication: one token per request from the caller's bucket.
pub async fn rate_limit(State(limiter): State<Arc<RateLimiter>>, req: Request, next: Next) -> Response {
    let Some(key) = req.extensions().get::<Caller>().and_then(|c| c.key()).cloned() else {
        return next.run(req).await; // auth is off: no key to count against
    };
    match limiter.take(&key.name, key.rate_per_second, key.burst, Instant::now()) {
        Ok(limit) => {
            let mut resp = next.run(req).await;
            limit.write(resp.headers_mut());
            resp
        }
        Err((limit, retry_after)) => GatewayError::Limited {
            code: "rate_limited",
            message: format!(
                "too many requests for API key {}: {} a second with a burst of {}; retry in {retry_after} s",
                key.name, key.rate_per_second, key.burst
            ),
            limit,
            retry_after,
        }
        .into_response(),
    }
}

/// Seconds from now to the next UTC midnight, when the daily quota starts again.
fn until_midnight(now: chrono::DateTime<Utc>) -> u64 {
    let next = now.date_naive().succ_opt().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|t| t.and_utc());
    next.map(|n| (n - now).num_seconds().max(1) as u64).unwrap_or(86_400)
}

/// One upload counted against its key's daily quota, to be settled when the upload is done.
/// If it is dropped unsettled (the request's future cancelled mid-upload), the count is given
/// back from a task of its own.
pub struct Charge {
    counted: Option<Counted>,
    limit: Option<Limit>,
}

/// What to give back.
struct Counted {
    deps: Deps,
    name: String,
    day: NaiveDate,
}

impl Counted {
    async fn give_back(self) {
        if let Err(e) = self.deps.storage.keys.give_back(&self.name, self.day).await {
            let e = txpipe_common::error::Chain(&e);
            tracing::warn!(key = %self.name, error = %e, "could not give back a failed upload's quota");
        }
    }
}

impl Charge {
    /// Counts one upload for the caller today, or refuses with 429 when the day's quota is
    /// spent. Nothing is counted when auth is off.
    pub async fn take(deps: &Deps, caller: &Caller) -> Result<Self, GatewayError> {
        let Some(key) = caller.key() else { return Ok(Self { counted: None, limit: None }) };
        let now = Utc::now();
        let (day, reset) = (now.date_naive(), until_midnight(now));
        let used = deps
            .storage
            .keys
            .consume(&key.name, day, key.daily_quota)
            .await
            .map_err(|e| GatewayError::from_storage("counting the upload against the daily quota", e))?;
        let mut limit = Limit { prefix: "X-Quota", limit: key.daily_quota, remaining: 0, reset };
        match used {
            QuotaUse::Counted(n) => {
                limit.remaining = key.daily_quota.saturating_sub(n);
                let counted = Counted { deps: deps.clone(), name: key.name.clone(), day };
                Ok(Self { counted: Some(counted), limit: Some(limit) })
            }
            QuotaUse::Exhausted => Err(GatewayError::Limited {
                code: "quota_exceeded",
                message: format!(
                    "API key {} has used its {} uploads for today (UTC); the quota starts again in {reset} s",
                    key.name, key.daily_quota
                ),
                limit,
                retry_after: reset,
            }),
        }
    }

    /// Keeps the count for an accepted upload (and says what is left, for the answer's
    /// headers: [`Limit::write`]); gives it back for a failed one, so a refused upload never
    /// uses up the quota. Settled as soon as the upload is committed, before any wait for its
    /// verdict, so a client that hangs up while waiting keeps its upload counted.
    pub async fn settle<T>(mut self, result: Result<T, GatewayError>) -> Result<(T, Option<Limit>), GatewayError> {
        match result {
            Ok(done) => {
                self.counted = None;
                Ok((done, self.limit))
            }
            Err(e) => {
                if let Some(counted) = self.counted.take() {
                    counted.give_back().await;
                }
                Err(e)
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(counted) = self.counted.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(counted.give_back());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        for left in [2, 1, 0] {
            assert_eq!(rl.take("k", 2.0, 3, t0).unwrap().remaining, left);
        }
        let (limit, retry) = rl.take("k", 2.0, 3, t0).unwrap_err();
        assert_eq!((limit.limit, limit.remaining, retry), (3, 0, 1));
        assert!(rl.take("other", 2.0, 3, t0).is_ok(), "each key has its own bucket");
        assert!(rl.take("k", 2.0, 3, t0 + Duration::from_millis(500)).is_ok(), "half a second gives one token");
        assert!(rl.take("k", 2.0, 3, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn the_quota_resets_at_utc_midnight() {
        let t = chrono::DateTime::parse_from_rfc3339("2024-01-15T23:59:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(until_midnight(t), 60);
    }
}
