//! One HTTP/1.1 request with `Expect: 100-continue`, for uploads.
//!
//! The gateway refuses many uploads before it reads a byte of the body (401 without a valid
//! key, 429 over a quota or rate, 413 on the declared length, 503 busy) and then closes the
//! connection. A client that is already streaming a large body has its write cut (`Broken
//! pipe`) and, racing the reset, usually loses the answer it was sent: hyper's client (under
//! reqwest) does not wait for `100 Continue`, so it cannot avoid that. This one sends the head
//! alone, waits for `100 Continue` (hyper's server sends it when the handler starts reading)
//! or for the final answer, and only then streams the file; a server that ignores `Expect`
//! gets the body after [`CONTINUE_WAIT`], as curl does.
//!
//! Plain `http://` only, like the rest of the client (the workspace's reqwest has no TLS).

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// How long to wait for `100 Continue` before sending the body anyway.
pub const CONTINUE_WAIT: Duration = Duration::from_secs(1);
/// How long one chunk of the body may wait to be taken by the connection: a server that
/// neither reads nor answers would otherwise hold the upload for ever.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// The largest response head or body read (the gateway's answers are a few hundred bytes).
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 4 * 1024 * 1024;

/// A response: status, headers (names lower-cased), body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the answer is not HTTP/1.1: {0}")]
    Protocol(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Reading the body to send failed (the file, not the network).
    #[error("{0}")]
    Source(std::io::Error),
}

/// What to send: the head's lines and a body of exactly `len` bytes read from `body`.
pub struct Request<'a, B> {
    pub host: &'a str,
    pub port: u16,
    /// The request target: path and query.
    pub target: &'a str,
    /// Extra header lines (`name`, `value`); values are checked by the caller.
    pub headers: Vec<(&'a str, String)>,
    pub len: u64,
    pub body: B,
}

/// Sends `req` as `POST` and reads the final answer, calling `on_bytes` as the body goes out.
/// `answer_within` bounds the wait for the answer once the body is sent (the gateway stores,
/// records and announces the file first).
pub async fn post<B: AsyncRead + Unpin>(
    req: Request<'_, B>,
    connect_within: Duration,
    answer_within: Duration,
    mut on_bytes: impl FnMut(u64),
) -> Result<Response, Error> {
    let authority = if req.host.contains(':') && !req.host.starts_with('[') {
        format!("[{}]:{}", req.host, req.port)
    } else {
        format!("{}:{}", req.host, req.port)
    };
    let stream = tokio::time::timeout(connect_within, tokio::net::TcpStream::connect(authority.as_str()))
        .await
        .map_err(|_| Error::Timeout(connect_within))??;
    let (mut rd, mut wr) = stream.into_split();
    let mut head = format!("POST {} HTTP/1.1\r\nhost: {authority}\r\ncontent-length: {}\r\n", req.target, req.len);
    head.push_str(concat!("user-agent: txpipe/", env!("CARGO_PKG_VERSION"), "\r\nconnection: close\r\n"));
    if req.len > 0 {
        head.push_str("expect: 100-continue\r\n");
    }
    for (name, value) in &req.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    wr.write_all(head.as_bytes()).await?;

    let mut buf = Vec::new();
    if req.len > 0 {
        // an early answer, or 100 Continue, or (a server that ignores Expect) nothing yet
        match tokio::time::timeout(CONTINUE_WAIT, read_head(&mut rd, &mut buf)).await {
            Ok(Ok(h)) if h.status == 100 => {
                buf.drain(..h.len);
            }
            Ok(Ok(h)) if (101..200).contains(&h.status) => {
                return Err(Error::Protocol(format!("unexpected {} before the body", h.status)))
            }
            Ok(Ok(h)) => return read_rest(&mut rd, buf, h, answer_within).await,
            Ok(Err(e)) => return Err(e),
            Err(_) => {}
        }
        let mut body = req.body.take(req.len);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        loop {
            let n = body.read(&mut chunk).await.map_err(Error::Source)?;
            if n == 0 {
                break;
            }
            let written = match tokio::time::timeout(WRITE_STALL, wr.write_all(&chunk[..n])).await {
                Ok(w) => w,
                Err(_) => return Err(Error::Timeout(WRITE_STALL)),
            };
            if let Err(e) = written {
                // the server answered and closed mid-body (a body that stalls, say): its
                // answer may still be readable
                return match tokio::time::timeout(Duration::from_secs(2), read_final(&mut rd, &mut buf)).await {
                    Ok(Ok(r)) => Ok(r),
                    _ => Err(Error::Io(e)),
                };
            }
            sent += n as u64;
            on_bytes(n as u64);
        }
        if sent != req.len {
            return Err(Error::Source(std::io::Error::other(format!(
                "the file is {sent} bytes now, not the {} it was when the upload started",
                req.len
            ))));
        }
    }
    wr.flush().await?;
    tokio::time::timeout(answer_within, read_final(&mut rd, &mut buf))
        .await
        .map_err(|_| Error::Timeout(answer_within))?
}

/// A parsed response head and its length in the buffer.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    len: usize,
}

/// Reads until `buf` holds a whole head; parses it. Cancel-safe: what was read stays in `buf`.
async fn read_head<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Result<Head, Error> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return parse_head(&buf[..end + 4]);
        }
        if buf.len() > MAX_HEAD {
            return Err(Error::Protocol("a response head over 64 KiB".into()));
        }
        let mut chunk = [0u8; 8192];
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed before an answer",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_head(raw: &[u8]) -> Result<Head, Error> {
    let text = std::str::from_utf8(raw).map_err(|_| Error::Protocol("a head that is not text".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") {
        return Err(Error::Protocol(crate::client::one_line(status_line)));
    }
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| Error::Protocol(crate::client::one_line(status_line)))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Head { status, headers, len: raw.len() })
}

/// The final answer: skips 1xx heads (a late 100 Continue), then reads the body.
async fn read_final<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Result<Response, Error> {
    loop {
        let head = read_head(rd, buf).await?;
        if head.status < 200 {
            buf.drain(..head.len);
            continue;
        }
        return read_body(rd, std::mem::take(buf), head).await;
    }
}

async fn read_rest<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: Vec<u8>,
    head: Head,
    within: Duration,
) -> Result<Response, Error> {
    tokio::time::timeout(within, read_body(rd, buf, head)).await.map_err(|_| Error::Timeout(within))?
}

/// The body after `head` (whose bytes start `buf`): by `content-length`, chunked, or to the
/// end of the connection (the request asked for it to close).
async fn read_body<R: AsyncRead + Unpin>(rd: &mut R, mut buf: Vec<u8>, head: Head) -> Result<Response, Error> {
    buf.drain(..head.len);
    let find = |name: &str| head.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let chunked = find("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let length = find("content-length").and_then(|v| v.parse::<usize>().ok());
    let body = if chunked {
        // simplest correct: the connection closes after the answer, so read it all, then decode
        read_to_end(rd, &mut buf).await?;
        dechunk(&buf)?
    } else if let Some(len) = length {
        if len > MAX_BODY {
            return Err(Error::Protocol(format!("an answer of {len} bytes")));
        }
        while buf.len() < len {
            let mut chunk = [0u8; 8192];
            let n = rd.read(&mut chunk).await?;
            if n == 0 {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.truncate(len);
        buf
    } else if head.status == 204 || head.status == 304 {
        Vec::new()
    } else {
        read_to_end(rd, &mut buf).await?;
        buf
    };
    Ok(Response { status: head.status, headers: head.headers, body })
}

async fn read_to_end<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Result<(), Error> {
    let mut limited = rd.take(MAX_BODY as u64);
    limited.read_to_end(buf).await?;
    Ok(())
}

/// Decodes a whole chunked body (trailers ignored).
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, Error> {
    let bad = || Error::Protocol("a malformed chunked body".into());
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| bad())?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad())?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size.checked_add(2).is_none_or(|end| raw.len() < end) {
            return Err(bad());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse() {
        let h = parse_head(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nRetry-After: 3\r\n\r\n")
            .unwrap();
        assert_eq!(h.status, 401);
        assert_eq!(h.headers[1], ("retry-after".to_owned(), "3".to_owned()));
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
        assert!(dechunk(b"5\r\nab").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"ffffffffffffffff\r\nab").is_err(), "a size that would overflow");
    }

    #[tokio::test]
    async fn an_early_answer_is_read_without_sending_the_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(s.read_u8().await.unwrap());
            }
            let head = String::from_utf8(head).unwrap();
            assert!(
                head.starts_with("POST /upload HTTP/1.1\r\n") && head.contains("\r\nexpect: 100-continue\r\n"),
                "{head}"
            );
            let body = br#"{"error":"unauthorized","message":"no key"}"#;
            let answer = format!("HTTP/1.1 401 Unauthorized\r\ncontent-length: {}\r\n\r\n", body.len());
            s.write_all(answer.as_bytes()).await.unwrap();
            s.write_all(body).await.unwrap();
        });
        let body: &[u8] = &[b'x'; 100_000];
        let req = Request { host: "127.0.0.1", port, target: "/upload", headers: vec![], len: 100_000, body };
        let mut sent = 0;
        let r = post(req, Duration::from_secs(5), Duration::from_secs(5), |n| sent += n).await.unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.body, br#"{"error":"unauthorized","message":"no key"}"#);
        assert_eq!(sent, 0, "not a byte of the body was sent");
        server.await.unwrap();
    }
}
