//! A small HTTP client of the gateway for the CLI: upload a file as a streamed raw body
//! (over [`crate::http1`], which waits for `100 Continue`), read a file's status and list
//! files (reqwest), and wait for a file's final status by polling.
//!
//! Every failure becomes a [`ClientError`] that prints as one line and, for `--json`, as one
//! JSON object: the gateway's own error body as it is when it sent one.

use reqwest::header::{HeaderValue, RETRY_AFTER};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use txpipe_common::status::FileStatus;

/// The header the gateway reads an upload's idempotency key from.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// How long to wait for a TCP connection to the gateway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a GET may take: statuses and pages are small, so a slower answer is a stuck gateway.
const GET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upload's answer may take once its body is sent: the gateway stores, records
/// and announces the file first (each bounded by its own timeouts, far below this).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(180);
/// Polling starts quick, for the small files that finish in a few hundred milliseconds, and
/// slows down to this, so a long file costs the gateway one request a second.
const FIRST_POLL: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_secs(1);
/// The longest a `Retry-After` is honoured while waiting (the gateway's quota answer may say
/// hours; a waiting client then checks again sooner, which costs one refused request).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Connection failures in a row after which waiting gives up (a gateway restarting comes
/// back within them; one that is gone does not).
const MAX_UNREACHABLE_IN_A_ROW: u32 = 20;

/// Why a request to the gateway did not give the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error status.
    #[error("{}", refused_line(*status, body))]
    Refused {
        status: u16,
        /// The answer's JSON (`{"error","message"}`), or the text wrapped as such.
        body: Value,
        /// Seconds, from the `Retry-After` header.
        retry_after: Option<u64>,
    },
    /// No answer: connection refused, reset, timed out.
    #[error("cannot reach the gateway at {url}: {}", chain(source.as_ref()))]
    Unreachable {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A local file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The gateway answered 2xx with something that is not what its API promises.
    #[error("unexpected answer from the gateway: {0}")]
    BadAnswer(String),
    /// A setting the client cannot send (a key or idempotency key that is no header value).
    #[error("{0}")]
    Usage(String),
    /// Waiting for a final status ran out of time.
    #[error("gave up waiting after {seconds} s; file {file_id} is still {status}")]
    Timeout { file_id: String, status: String, seconds: u64 },
}

impl ClientError {
    /// The error as one JSON object for `--json`: the gateway's body as it is, or the same
    /// shape (`error`, `message`) for errors of the client's own.
    pub fn to_json(&self) -> Value {
        let code = match self {
            ClientError::Refused { body, .. } => return body.clone(),
            ClientError::Unreachable { .. } => "unreachable",
            ClientError::File { .. } => "unreadable_file",
            ClientError::BadAnswer(_) => "bad_answer",
            ClientError::Usage(_) => "usage",
            // the file was accepted: a script needs its id to look again later
            ClientError::Timeout { file_id, status, .. } => {
                return serde_json::json!({
                    "error": "timeout", "message": self.to_string(), "file_id": file_id, "status": status
                });
            }
        };
        serde_json::json!({ "error": code, "message": self.to_string() })
    }

    /// True for answers worth asking again after a pause while waiting: the gateway busy,
    /// rate-limited or briefly without storage or broker.
    fn is_transient(&self) -> bool {
        matches!(self, ClientError::Refused { status: 429 | 502 | 503 | 504, .. })
    }
}

/// `401 unauthorized: message`, with what to do about a missing key.
fn refused_line(status: u16, body: &Value) -> String {
    let code = body["error"].as_str().unwrap_or("error");
    let message = one_line(body["message"].as_str().unwrap_or(""));
    let mut line = format!("the gateway answered {status} {code}: {message}");
    if status == 401 {
        line.push_str(" (give a key with --api-key or TXPIPE_API_KEY)");
    }
    line
}

/// An error and its causes on one line (reqwest's own message alone says little).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    one_line(&txpipe_common::error::Chain(e).to_string())
}

/// Text made safe for one line of a terminal: control characters escaped, at most 500 chars.
pub fn one_line(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 500 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A gateway at a base URL, with the API key to send, if any.
pub struct Gateway {
    base: String,
    key: Option<HeaderValue>,
    http: reqwest::Client,
}

impl Gateway {
    pub fn new(base: &str, key: Option<&str>) -> Result<Self, ClientError> {
        let key = match key {
            Some(k) => Some(HeaderValue::from_str(k).map_err(|_| {
                ClientError::Usage(
                    "the API key has characters a header cannot carry (check --api-key / TXPIPE_API_KEY)".into(),
                )
            })?),
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot make an HTTP client: {}", chain(&e))))?;
        let base = base.trim_end_matches('/').to_owned();
        // the workspace's reqwest is built without TLS (the services never need it), so say so
        // here rather than fail on the first request
        match reqwest::Url::parse(&base) {
            Ok(u) if u.scheme() == "http" => {}
            Ok(u) if u.scheme() == "https" => {
                return Err(ClientError::Usage(format!(
                "--gateway {}: this txpipe speaks plain http:// only (reach an https gateway through a local proxy)",
                one_line(&base)
            )))
            }
            _ => return Err(ClientError::Usage(format!("--gateway {} is not an http:// URL", one_line(&base)))),
        }
        Ok(Self { base, key, http })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.request_to(method, &format!("{}{path}", self.base))
    }

    fn request_to(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.key {
            Some(k) => req.header(txpipe_common::auth::KEY_HEADER, k.clone()),
            None => req,
        }
    }

    /// Uploads `path` as a raw `text/csv` body, streamed from disk (never whole in memory),
    /// calling `on_bytes` with each chunk's size as it is written to the connection. Returns
    /// the gateway's 2xx answer (`file_id`, `status`, ...). Sent with `Expect: 100-continue`
    /// (see [`crate::http1`]), so a refusal before the body (401, 413, 429, 503) is read as the
    /// gateway's answer, not lost to a cut connection.
    pub async fn upload(
        &self,
        path: &Path,
        idempotency_key: Option<&str>,
        on_bytes: impl FnMut(u64),
    ) -> Result<Value, ClientError> {
        let file_error = |source| ClientError::File { path: path.display().to_string(), source };
        let file = tokio::fs::File::open(path).await.map_err(file_error)?;
        let meta = file.metadata().await.map_err(file_error)?;
        if !meta.is_file() {
            return Err(file_error(std::io::Error::other("not a regular file")));
        }
        let len = meta.len();
        let url = reqwest::Url::parse(&format!("{}/upload", self.base))
            .map_err(|e| ClientError::Usage(format!("--gateway {} is not a URL: {e}", one_line(&self.base))))?;
        let host = url
            .host_str()
            .ok_or_else(|| ClientError::Usage(format!("--gateway {} has no host", one_line(&self.base))))?;
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        // header values were checked (HeaderValue::from_str refuses CR, LF and the like), so
        // nothing can be smuggled into the head
        let mut headers = vec![("content-type", "text/csv".to_owned())];
        if let Some(k) = &self.key {
            headers.push((txpipe_common::auth::KEY_HEADER, String::from_utf8_lossy(k.as_bytes()).into_owned()));
        }
        if let Some(k) = idempotency_key {
            if HeaderValue::from_str(k).is_err() || k.is_empty() {
                return Err(ClientError::Usage(format!("--idempotency-key {k:?} is not a header value")));
            }
            headers.push((IDEMPOTENCY_HEADER, k.to_owned()));
        }
        let req = crate::http1::Request {
            host,
            port: url.port_or_known_default().unwrap_or(80),
            target: &target,
            headers,
            len,
            body: file,
        };
        let resp = match crate::http1::post(req, CONNECT_TIMEOUT, ANSWER_TIMEOUT, on_bytes).await {
            Ok(r) => r,
            Err(crate::http1::Error::Source(source)) => return Err(file_error(source)),
            Err(crate::http1::Error::Protocol(p)) => return Err(ClientError::BadAnswer(p)),
            Err(e) => return Err(ClientError::Unreachable { url: self.base.clone(), source: Box::new(e) }),
        };
        let retry_after = resp.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok());
        let answer = interpret(resp.status, retry_after, &String::from_utf8_lossy(&resp.body))?;
        if answer["file_id"].as_str().is_none() {
            return Err(ClientError::BadAnswer(format!(
                "an upload answer without a file_id: {}",
                one_line(&answer.to_string())
            )));
        }
        Ok(answer)
    }

    /// `GET /files/{file_id}`: the status record as the gateway gives it.
    pub async fn file(&self, file_id: &str) -> Result<Value, ClientError> {
        // a file id is a UUID; anything else is refused by the gateway with a 404 of its own,
        // so only what would change the path's shape is escaped
        let id: String = file_id
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        self.send(self.request(reqwest::Method::GET, &format!("/files/{id}")).timeout(GET_TIMEOUT)).await
    }

    /// `GET /files?…`: one page, `{"items": [...], "next_cursor"}`.
    pub async fn files(&self, query: &[(&str, String)]) -> Result<Value, ClientError> {
        let mut url = reqwest::Url::parse(&format!("{}/files", self.base))
            .map_err(|e| ClientError::Usage(format!("--gateway {} is not a URL: {e}", one_line(&self.base))))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        self.send(self.request_to(reqwest::Method::GET, url.as_str()).timeout(GET_TIMEOUT)).await
    }

    /// Polls `GET /files/{file_id}` until its status is final, calling `on_record` with every
    /// answer. Polls every 100 ms at first, then less often, up to once a second; a busy or
    /// rate-limited gateway is asked again after its `Retry-After`, one that cannot be reached
    /// is asked again for a while. Gives up after `timeout`, if one is given.
    pub async fn wait_final(
        &self,
        file_id: &str,
        timeout: Option<Duration>,
        mut on_record: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        let started = tokio::time::Instant::now();
        let mut pause = FIRST_POLL;
        let mut unreachable = 0;
        let mut last_status = String::from("unknown");
        loop {
            let wait = match self.file(file_id).await {
                Ok(record) => {
                    unreachable = 0;
                    on_record(&record);
                    let status = record["status"].as_str().unwrap_or("").to_owned();
                    if FileStatus::parse(&status).is_some_and(FileStatus::is_final) {
                        return Ok(record);
                    }
                    last_status = status;
                    let now = pause;
                    pause = (pause * 3 / 2).min(MAX_POLL);
                    now
                }
                Err(e) if e.is_transient() => match &e {
                    ClientError::Refused { retry_after: Some(s), .. } => Duration::from_secs(*s).min(MAX_RETRY_AFTER),
                    _ => MAX_POLL,
                },
                Err(ClientError::Unreachable { .. }) if unreachable < MAX_UNREACHABLE_IN_A_ROW => {
                    unreachable += 1;
                    MAX_POLL
                }
                Err(e) => return Err(e),
            };
            if let Some(limit) = timeout {
                let elapsed = started.elapsed();
                if elapsed >= limit {
                    return Err(ClientError::Timeout {
                        file_id: file_id.to_owned(),
                        status: last_status,
                        seconds: limit.as_secs(),
                    });
                }
                tokio::time::sleep(wait.min(limit - elapsed)).await;
            } else {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// Sends a request and reads its JSON answer; any non-2xx is [`ClientError::Refused`].
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable { url: self.base.clone(), source: Box::new(e) };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let retry_after =
            resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        let text = resp.text().await.map_err(unreachable)?;
        interpret(status, retry_after, &text)
    }
}

/// An answer's JSON if it is a 2xx; otherwise [`ClientError::Refused`] with the gateway's error
/// body (or the text in the same shape, from a proxy or hyper's bare 400).
fn interpret(status: u16, retry_after: Option<u64>, text: &str) -> Result<Value, ClientError> {
    let parsed = serde_json::from_str::<Value>(text);
    if (200..300).contains(&status) {
        return parsed
            .map_err(|_| ClientError::BadAnswer(format!("{status} with a body that is not JSON: {}", one_line(text))));
    }
    let body = match parsed {
        Ok(v) if v["error"].is_string() => v,
        _ => {
            let reason = reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason());
            serde_json::json!({
                "error": reason.unwrap_or("error").to_lowercase().replace(' ', "_"),
                "message": one_line(text.trim()),
            })
        }
    };
    Err(ClientError::Refused { status, body, retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_one_line_and_its_json_is_the_gateways() {
        let body = serde_json::json!({"error": "unauthorized", "message": "a key is needed\nhere"});
        let e = ClientError::Refused { status: 401, body: body.clone(), retry_after: None };
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("401 unauthorized") && line.contains("--api-key"), "{line}");
        assert_eq!(e.to_json(), body);
    }

    #[test]
    fn client_errors_have_the_gateways_shape_in_json() {
        let e = ClientError::Timeout { file_id: "f".into(), status: "processing".into(), seconds: 3 };
        assert_eq!(e.to_json()["error"], "timeout");
        assert!(e.to_json()["message"].as_str().unwrap().contains("processing"));
        // the file was accepted: its id and last status as fields, for a script to look again
        assert_eq!((e.to_json()["file_id"].as_str(), e.to_json()["status"].as_str()), (Some("f"), Some("processing")));
    }

    #[test]
    fn one_line_escapes_controls_and_caps_length() {
        assert_eq!(one_line("a\nb\x1b"), "a\\nb\\u{1b}");
        assert_eq!(one_line(&"x".repeat(600)).chars().count(), 501);
        assert_eq!(one_line("plain"), "plain");
    }
}
