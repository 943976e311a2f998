//! What went wrong in storage, and the one place that decides what a caller does about it.
//!
//! A [`StorageError`] has a [`StorageErrorKind`] (the distinctions callers match on: not found,
//! already exists, an invalid cursor, a failed upload stream...), a context text that names the
//! fix where there is one, and the error it came from (SDK, SQLite, I/O) as its `source()`.
//! Each kind belongs to a [`StorageClass`], and the class alone decides whether a worker retries
//! and which HTTP status a service answers, so the workers, the streaming CSV path and the
//! gateway cannot drift apart.

use axum::http::StatusCode;
use std::error::Error;
use std::fmt;
use std::io;

/// An error from below the storage port, kept whole for `source()` and downcasting.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// What a storage failure means for the caller: the only input to what happens next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageClass {
    /// The store could not do it now (I/O, busy, throttled, network, 5xx): retrying may help.
    Transient,
    /// Retrying cannot help: the store refused the request or holds something unusable.
    Permanent,
    /// The item does not exist (permanent for this item).
    NotFound,
    /// The store is set up wrong (a missing bucket or table, credentials): fix the setup.
    Misconfigured,
    /// The caller's input is at fault (a cursor the store never handed out, an upload stream
    /// that failed): the caller must change its request.
    Invalid,
}

impl StorageClass {
    /// True when trying again later may succeed: a worker retries these and dead-letters the rest.
    pub fn is_transient(self) -> bool {
        self == StorageClass::Transient
    }

    /// The HTTP status a service answers with. A misconfigured store is 503 like an outage:
    /// the client's request was fine and may pass once the operator fixes the setup.
    pub fn http_status(self) -> StatusCode {
        match self {
            StorageClass::NotFound => StatusCode::NOT_FOUND,
            StorageClass::Transient | StorageClass::Misconfigured => StatusCode::SERVICE_UNAVAILABLE,
            StorageClass::Invalid => StatusCode::BAD_REQUEST,
            StorageClass::Permanent => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The distinctions callers need; each belongs to one [`StorageClass`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// The item does not exist.
    NotFound,
    /// A create found the item already there.
    AlreadyExists,
    /// The store could not do it now.
    Unavailable,
    /// The store understood the request and refused it (a non-retryable 4xx other than the
    /// ones named here): sending it again gets the same answer.
    Rejected,
    /// The stream being stored failed (client went away, upload over the limit); the
    /// stream's error is the source.
    UploadFailed,
    /// A pagination cursor that this store did not hand out.
    InvalidCursor,
    /// The store is set up wrong (a missing bucket or table, credentials).
    Misconfigured,
    /// A stored item that cannot be read back.
    Corrupt,
}

impl StorageErrorKind {
    pub fn class(self) -> StorageClass {
        match self {
            StorageErrorKind::Unavailable => StorageClass::Transient,
            StorageErrorKind::NotFound => StorageClass::NotFound,
            StorageErrorKind::Misconfigured => StorageClass::Misconfigured,
            StorageErrorKind::UploadFailed | StorageErrorKind::InvalidCursor => StorageClass::Invalid,
            StorageErrorKind::AlreadyExists | StorageErrorKind::Rejected | StorageErrorKind::Corrupt => {
                StorageClass::Permanent
            }
        }
    }
}

/// A storage failure: its kind, what was being done (naming the fix where there is one), and
/// the error it came from.
///
/// The message is the kind and the context only; the source's text follows in an error chain
/// (`{:#}` with anyhow, or [`crate::error::Chain`] where a message leaves the process).
#[derive(Debug)]
pub struct StorageError {
    kind: StorageErrorKind,
    context: String,
    source: Option<BoxError>,
}

impl StorageError {
    pub fn new(kind: StorageErrorKind, context: impl Into<String>) -> Self {
        Self { kind, context: context.into(), source: None }
    }

    /// The same error, caused by `source`.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// `what` (e.g. "file {id}") does not exist.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::NotFound, what)
    }

    /// `what` is already there.
    pub fn already_exists(what: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::AlreadyExists, what)
    }

    /// The store could not do `context` now.
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Unavailable, context)
    }

    /// The store is set up wrong; `context` says how to fix it.
    pub fn misconfigured(context: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Misconfigured, context)
    }

    /// A stored item (`what`) cannot be read back.
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Corrupt, what)
    }

    pub fn invalid_cursor() -> Self {
        Self::new(StorageErrorKind::InvalidCursor, "")
    }

    /// The upload stream failed with `e`.
    pub fn upload_failed(e: io::Error) -> Self {
        Self::new(StorageErrorKind::UploadFailed, "").with_source(e)
    }

    pub fn kind(&self) -> StorageErrorKind {
        self.kind
    }

    pub fn class(&self) -> StorageClass {
        self.kind.class()
    }

    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        self.class().is_transient()
    }

    /// The storage error an [`io::Error`] carries, as [`super::open_blocking`] makes them.
    pub fn in_io(e: &io::Error) -> Option<&StorageError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<StorageError>())
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.context;
        match self.kind {
            StorageErrorKind::NotFound => write!(f, "{c} not found"),
            StorageErrorKind::AlreadyExists => write!(f, "{c} already exists"),
            StorageErrorKind::Unavailable => write!(f, "storage unavailable: {c}"),
            StorageErrorKind::Rejected => write!(f, "storage refused the request: {c}"),
            StorageErrorKind::UploadFailed => f.write_str("the upload stream failed"),
            StorageErrorKind::InvalidCursor => {
                f.write_str("invalid cursor: pass back a next_cursor from an earlier page")
            }
            StorageErrorKind::Misconfigured => write!(f, "storage misconfigured: {c}"),
            StorageErrorKind::Corrupt => write!(f, "corrupt stored item: {c}"),
        }
    }
}

impl Error for StorageError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

/// For readers on the blocking pool (CSV parsing): the storage error travels inside the
/// `io::Error`, so whoever handles the read failure still sees its class ([`StorageError::in_io`]).
impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> Self {
        let kind = match e.class() {
            StorageClass::NotFound => io::ErrorKind::NotFound,
            StorageClass::Invalid => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StorageErrorKind as K;

    const KINDS: [StorageErrorKind; 8] = [
        K::NotFound,
        K::AlreadyExists,
        K::Unavailable,
        K::Rejected,
        K::UploadFailed,
        K::InvalidCursor,
        K::Misconfigured,
        K::Corrupt,
    ];

    #[test]
    fn only_an_unavailable_store_is_retried() {
        for kind in KINDS {
            assert_eq!(StorageError::new(kind, "x").is_transient(), kind == K::Unavailable, "{kind:?}");
        }
    }

    #[test]
    fn each_kind_answers_its_http_status() {
        let status = |kind: StorageErrorKind| StorageError::new(kind, "x").class().http_status().as_u16();
        let expected = [
            (K::NotFound, 404),
            (K::AlreadyExists, 500),
            (K::Unavailable, 503),
            (K::Rejected, 500),
            (K::UploadFailed, 400),
            (K::InvalidCursor, 400),
            (K::Misconfigured, 503),
            (K::Corrupt, 500),
        ];
        assert_eq!(expected.len(), KINDS.len());
        for (kind, code) in expected {
            assert_eq!(status(kind), code, "{kind:?}");
        }
    }

    #[test]
    fn the_source_is_kept_and_the_message_names_the_context() {
        let e = StorageError::unavailable("cannot open /x")
            .with_source(io::Error::new(io::ErrorKind::PermissionDenied, "denied"));
        assert_eq!(e.to_string(), "storage unavailable: cannot open /x");
        let source = e.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(source.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(StorageError::not_found("file 1").to_string(), "file 1 not found");
    }

    #[test]
    fn an_io_error_carries_the_storage_error_and_its_class() {
        let io: io::Error = StorageError::misconfigured("no bucket").into();
        assert_eq!(io.kind(), io::ErrorKind::Other);
        assert_eq!(StorageError::in_io(&io).unwrap().class(), StorageClass::Misconfigured);
        let io: io::Error = StorageError::not_found("object k").into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        assert_eq!(io.to_string(), "object k not found");
        assert!(StorageError::in_io(&io::Error::other("plain")).is_none());
    }
}
