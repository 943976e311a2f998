//! `txpipe keys create|list|revoke|ensure`, and the key `txpipe up` makes for local use.
//!
//! The local key is made on the first `txpipe up` (an admin key named `local`) and kept in
//! `{data_dir}/{ns}-api-key`, readable by its owner only (0600), so later starts can print it
//! again, as a notebook server prints its token. `txpipe keys ensure` does the same for any
//! file (compose makes Prometheus's key with it).

use anyhow::Context;
use std::path::PathBuf;
use txpipe_common::auth::{self, KeyLimits, Secret};
use txpipe_common::storage::{ApiKeyRecord, ApiKeyStore, StorageErrorKind};
use txpipe_common::Settings;

/// One key as `txpipe keys list --json` shows it: never the secret, nor its hash.
pub fn describe(key: &ApiKeyRecord) -> serde_json::Value {
    serde_json::json!({
        "name": key.name,
        "admin": key.admin,
        "daily_quota": key.daily_quota,
        "rate_per_second": key.rate_per_second,
        "burst": key.burst,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    })
}

/// The lines of `txpipe keys list`.
pub fn table(keys: &[ApiKeyRecord]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<24}  {:<5}  {:>11}  {:>8}  {:>5}  {:<20}  REVOKED",
        "NAME", "ADMIN", "DAILY_QUOTA", "RATE/S", "BURST", "CREATED"
    )];
    for k in keys {
        out.push(format!(
            "{:<24}  {:<5}  {:>11}  {:>8}  {:>5}  {:<20}  {}",
            k.name,
            if k.admin { "yes" } else { "no" },
            k.daily_quota,
            k.rate_per_second,
            k.burst,
            k.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
            k.revoked_at.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| "-".into())
        ));
    }
    out
}

/// Where `txpipe up` keeps its local key.
pub fn local_key_path(settings: &Settings) -> PathBuf {
    settings.data_dir.join(format!("{}-api-key", settings.namespace))
}

/// The key for local use: an admin key named `local`, kept in [`local_key_path`].
pub async fn local_key(settings: &Settings, store: &dyn ApiKeyStore) -> anyhow::Result<Secret> {
    ensure_key(settings, store, "local", true, &local_key_path(settings)).await
}

/// The key kept in `path` if storage still knows it and it is not revoked; else a new key
/// (`name`, or `name-…` if that name is taken), written there with mode 0600.
pub async fn ensure_key(
    settings: &Settings,
    store: &dyn ApiKeyStore,
    name: &str,
    admin: bool,
    path: &std::path::Path,
) -> anyhow::Result<Secret> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let kept = Secret::new(text.trim());
        let known = store.get_by_hash(&auth::hash_key(kept.expose())).await?;
        if known.is_some_and(|k| k.revoked_at.is_none()) {
            return Ok(kept);
        }
    }
    let limits = KeyLimits::defaults(settings);
    let secret = match auth::create_key(store, name, admin, limits).await {
        Ok((_, secret)) => secret,
        Err(auth::KeyError::Storage(e)) if e.kind() == StorageErrorKind::AlreadyExists => {
            let name = format!("{name}-{}", &clock_suffix());
            auth::create_key(store, &name, admin, limits).await?.1
        }
        Err(e) => return Err(e.into()),
    };
    write_private(path, secret.expose()).with_context(|| format!("cannot keep the key in {}", path.display()))?;
    Ok(secret)
}

/// Eight hex digits from the clock, enough to tell kept keys of one name apart.
fn clock_suffix() -> String {
    format!("{:08x}", chrono::Utc::now().timestamp_subsec_nanos() ^ (chrono::Utc::now().timestamp() as u32))
}

/// Writes `text` to `path`, readable and writable by its owner only (on Unix).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    // a file that was there before keeps its mode on open: set it again
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    (&file).write_all(format!("{text}\n").as_bytes())
}
