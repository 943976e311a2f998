//! API keys: making them, recognising them on a request, and who the caller then is.
//!
//! A key is `txp_` and 64 hex digits (32 random bytes from the operating system). It is shown
//! once, when it is made; storage keeps only its SHA-256. A fast hash is right here: the secret
//! has 256 bits of entropy, so there is nothing to guess that a slow hash would protect, and
//! every request must hash the key it presents. The lookup is by that hash, so the secret
//! itself is never compared; the stored hash is compared again in constant time anyway.
//!
//! [`require_key`] is the axum middleware every keyed route sits behind (the gateway's routes
//! and every binary's `/metrics`); it puts the [`Caller`] into the request's extensions.

use crate::config::AuthMode;
use crate::deps::Deps;
use crate::error::Chain;
use crate::storage::{ApiKeyRecord, ApiKeyStore, StorageError};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// What every key starts with, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "txp_";
/// The header API Gateway reads keys from; `Authorization: Bearer` works too.
pub const KEY_HEADER: &str = "x-api-key";

/// A secret that never shows itself by accident: Debug and Display print `txp_…(redacted)`;
/// only [`Secret::expose`] gives the text.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret itself: for the one place that must print or send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY_PREFIX}…(redacted)")
    }
}

/// The hex SHA-256 of a presented key: what storage keeps and looks keys up by.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Equal without an early exit, so the time taken says nothing about where two hashes differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A quota and rate for a key, checked before it is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeyLimits {
    pub daily_quota: u64,
    pub rate_per_second: f64,
    pub burst: u32,
}

impl KeyLimits {
    /// The defaults of the settings (`TXPIPE_DAILY_QUOTA`, `TXPIPE_RATE_PER_SECOND`, `TXPIPE_RATE_BURST`).
    pub fn defaults(settings: &crate::Settings) -> Self {
        Self {
            daily_quota: settings.daily_quota,
            rate_per_second: settings.rate_per_second,
            burst: settings.rate_burst,
        }
    }

    /// Refuses limits that would lock a key out for good or break the token bucket.
    pub fn check(daily_quota: u64, rate_per_second: f64, burst: u32) -> Result<(), KeyError> {
        if daily_quota == 0 || !(rate_per_second.is_finite() && rate_per_second > 0.0) || burst == 0 {
            return Err(KeyError::Limits);
        }
        Ok(())
    }
}

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key name is 1 to 64 letters, digits, '.', '_' or '-'")]
    Name,
    #[error("a key needs a daily quota of at least 1, a rate above 0 and a burst of at least 1")]
    Limits,
    #[error("{}", Chain(.0))]
    Storage(#[from] StorageError),
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Makes a key named `name`, stores its hash, and returns the record and the secret (the only
/// time it exists outside the caller's hands).
pub async fn create_key(
    store: &dyn ApiKeyStore,
    name: &str,
    admin: bool,
    limits: KeyLimits,
) -> Result<(ApiKeyRecord, Secret), KeyError> {
    if !valid_name(name) {
        return Err(KeyError::Name);
    }
    KeyLimits::check(limits.daily_quota, limits.rate_per_second, limits.burst)?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| StorageError::unavailable(format!("the operating system gave no random bytes: {e}")))?;
    let secret = Secret(format!("{KEY_PREFIX}{}", hex::encode(bytes)));
    let record = ApiKeyRecord {
        name: name.to_owned(),
        hash: hash_key(secret.expose()),
        admin,
        daily_quota: limits.daily_quota,
        rate_per_second: limits.rate_per_second,
        burst: limits.burst,
        created_at: chrono::Utc::now(),
        revoked_at: None,
    };
    store.create(&record).await?;
    Ok((record, secret))
}

/// Who is asking: a key, or anyone at all when `TXPIPE_AUTH=none`.
#[derive(Clone, Debug)]
pub struct Caller {
    key: Option<ApiKeyRecord>,
}

impl Caller {
    /// Anyone: auth is off.
    pub fn anonymous() -> Self {
        Self { key: None }
    }

    /// The key's record; None when auth is off.
    pub fn key(&self) -> Option<&ApiKeyRecord> {
        self.key.as_ref()
    }

    /// The key's name, recorded as the owner of what it uploads.
    pub fn name(&self) -> Option<&str> {
        self.key.as_ref().map(|k| k.name.as_str())
    }

    /// May this caller see a file uploaded by `owner`? Its own files, or any with an admin key
    /// (or with auth off). A file without an owner (uploaded with auth off) is the admins'.
    pub fn may_read(&self, owner: Option<&str>) -> bool {
        match &self.key {
            None => true,
            Some(k) => k.admin || owner == Some(k.name.as_str()),
        }
    }
}

/// Why a request was not let in.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is required: send it in the x-api-key header or as Authorization: Bearer <key>")]
    Missing,
    #[error("the API key is not known")]
    Unknown,
    #[error("two different API keys were sent (x-api-key twice, or x-api-key and Authorization: Bearer): send one")]
    Ambiguous,
    #[error("the API key has been revoked")]
    Revoked,
    #[error("service unavailable, try again later: checking the API key: {0}")]
    Unavailable(String),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let (status, code) = match self {
            AuthError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::UNAUTHORIZED, "unauthorized"),
        };
        let body = serde_json::json!({"error": code, "message": self.to_string()});
        let mut resp = (status, axum::Json(body)).into_response();
        let extra = match status {
            StatusCode::UNAUTHORIZED => (header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
            _ => (header::RETRY_AFTER, HeaderValue::from_static("5")),
        };
        resp.headers_mut().insert(extra.0, extra.1);
        resp
    }
}

/// The key a request presents, in `x-api-key` or as `Authorization: Bearer` (other schemes
/// are not keys). Sent more than once, the copies must agree: of two different keys, which one
/// a client or a proxy meant cannot be known, so neither is taken.
pub fn presented(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    fn bearer(v: &HeaderValue) -> Option<&str> {
        let (scheme, token) = v.to_str().ok()?.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
    // an x-api-key that is no text counts as an empty one
    let mut given = headers
        .get_all(KEY_HEADER)
        .iter()
        .map(|v| v.to_str().map(str::trim).unwrap_or(""))
        .chain(headers.get_all(header::AUTHORIZATION).iter().filter_map(bearer));
    let Some(first) = given.next() else { return Ok(None) };
    if given.any(|other| other != first) {
        return Err(AuthError::Ambiguous);
    }
    Ok(Some(first).filter(|k| !k.is_empty()))
}

/// Who the request comes from, by the key it presents (checked in storage on every request,
/// so a revocation takes effect at once on every replica).
pub async fn authenticate(deps: &Deps, headers: &HeaderMap) -> Result<Caller, AuthError> {
    if deps.settings.auth == AuthMode::None {
        return Ok(Caller::anonymous());
    }
    let key = presented(headers)?.ok_or(AuthError::Missing)?;
    let hash = hash_key(key);
    let record = deps
        .storage
        .keys
        .get_by_hash(&hash)
        .await
        .map_err(|e| AuthError::Unavailable(Chain(&e).to_string()))?
        .filter(|r| same(&r.hash, &hash))
        .ok_or(AuthError::Unknown)?;
    if record.revoked_at.is_some() {
        return Err(AuthError::Revoked);
    }
    Ok(Caller { key: Some(record) })
}

/// Middleware: lets a request through only with a valid key, the [`Caller`] in its extensions.
pub async fn require_key(State(deps): State<Deps>, mut req: Request, next: Next) -> Response {
    match authenticate(&deps, req.headers()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_presented_either_way() {
        let key = |h: &HeaderMap| presented(h).map_err(|e| e.to_string()).map(|k| k.map(str::to_owned));
        let mut h = HeaderMap::new();
        assert_eq!(key(&h), Ok(None));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer txp_abc"));
        assert_eq!(key(&h), Ok(Some("txp_abc".into())));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwdw=="));
        assert_eq!(key(&h), Ok(None));
        h.insert(KEY_HEADER, HeaderValue::from_static("txp_def"));
        assert_eq!(key(&h), Ok(Some("txp_def".into())), "another scheme's credentials are no key");
        // the same key both ways is one key; two different keys are none
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer txp_def"));
        assert_eq!(key(&h), Ok(Some("txp_def".into())));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer txp_other"));
        assert!(key(&h).unwrap_err().contains("two different API keys"));
        h.remove(header::AUTHORIZATION);
        h.append(KEY_HEADER, HeaderValue::from_static("txp_bogus"));
        assert!(key(&h).unwrap_err().contains("send one"));
    }

    #[test]
    fn secrets_do_not_show_and_hashes_are_sha256() {
        let s = Secret::new("txp_sekrit");
        assert!(!format!("{s} {s:?}").contains("sekrit"));
        assert_eq!(hash_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    #[test]
    fn names_and_limits_are_checked() {
        assert!(valid_name("ci-bot.eu_1") && !valid_name("") && !valid_name("a b") && !valid_name(&"x".repeat(65)));
        assert!(KeyLimits::check(1, 0.5, 1).is_ok());
        for (q, r, b) in [(0, 1.0, 1), (1, 0.0, 1), (1, f64::NAN, 1), (1, 1.0, 0)] {
            assert!(KeyLimits::check(q, r, b).is_err(), "{q} {r} {b}");
        }
    }

    #[test]
    fn callers_read_their_own_files_and_admins_all() {
        let key = |admin| ApiKeyRecord {
            name: "a".into(),
            hash: String::new(),
            admin,
            daily_quota: 1,
            rate_per_second: 1.0,
            burst: 1,
            created_at: chrono::Utc::now(),
            revoked_at: None,
        };
        let (user, admin) = (Caller { key: Some(key(false)) }, Caller { key: Some(key(true)) });
        assert!(user.may_read(Some("a")) && !user.may_read(Some("b")) && !user.may_read(None));
        assert!(admin.may_read(Some("b")) && admin.may_read(None));
        assert!(Caller::anonymous().may_read(Some("b")));
    }
}
