//! No client can wedge the gateway, an upload is all or nothing whatever the client does, and
//! every error answer has the one JSON shape: against the real broker, over real HTTP (raw TCP
//! where a well-behaved client library would not misbehave enough).

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use txpipe_common::status::{FileStatus, StatusRecord};
use txpipe_common::FileId;
use txpipe_tests::{valid_csv, TestFleet};

/// The head of a POST /upload declaring `len` body bytes, with the fleet's key header.
fn upload_head(fleet: &TestFleet, len: usize) -> String {
    let (k, v) = fleet.key_header();
    format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Type: text/csv\r\nContent-Length: {len}\r\n{k}: {v}\r\n\r\n",
        fleet.addr()
    )
}

/// Opens a connection and sends `bytes`.
async fn send_raw(fleet: &TestFleet, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(fleet.addr()).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    s
}

/// Reads until the server closes the connection (or `within` passes): what it sent, or None.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.ok().map(|_| String::from_utf8_lossy(&out).into_owned())
}

/// Polls `check` until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_are_cut_off_and_leave_nothing_while_others_are_accepted() {
    const STALLED: usize = 300;
    let idle = Duration::from_millis(1500);
    let fleet = TestFleet::spawn_with(|s| {
        s.body_idle_timeout_ms = idle.as_millis() as u64;
        s.max_uploads_in_flight = 400;
    })
    .await;
    let head = upload_head(&fleet, 100_000);
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(send_raw(&fleet, format!("{head}transaction_id,am").as_bytes()).await);
    }
    // the gateway keeps taking normal uploads meanwhile
    let mut accepted = Vec::new();
    for i in 0..5 {
        accepted.push(fleet.upload(valid_csv(&format!("ok{i}"), 3)).await.file_id);
    }
    let closed = futures::future::join_all(stalled.iter_mut().map(|s| read_until_closed(s, idle * 6))).await;
    let took = started.elapsed();
    assert!(closed.iter().all(Option::is_some), "every stalled upload is closed by the gateway");
    let answered = closed.iter().flatten().filter(|r| r.contains(" 408 ") && r.contains("body_timeout")).count();
    assert!(answered > 0, "stalled uploads are told why: {:?}", closed.first());
    assert!(took < idle * 6, "closed within the body timeout (plus setup): {took:?}");
    for id in &accepted {
        fleet.wait_for_status(*id, &[FileStatus::Completed]).await;
    }
    assert_eq!(fleet.object_count().await, accepted.len(), "no partial object is left");
    assert_eq!(fleet.unannounced().await, vec![]);
    let metrics = fleet.http.get(format!("{}/metrics", fleet.base_url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("result=\"body_timeout\""), "stalled uploads are counted");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_is_cut_off_like_a_stalled_one() {
    let idle = Duration::from_millis(600);
    let fleet = TestFleet::spawn_with(|s| s.body_idle_timeout_ms = idle.as_millis() as u64).await;
    let mut s = send_raw(&fleet, upload_head(&fleet, 100_000).as_bytes()).await;
    // a byte every 50 ms: never idle, but far under 1 KiB a period
    let started = Instant::now();
    let mut answer = None;
    while started.elapsed() < idle * 10 {
        if s.write_all(b"x").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            break;
        }
    }
    let answer = answer.expect("the gateway answered a trickling upload");
    assert!(answer.contains(" 408 ") && answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() < idle * 4, "cut after about one period: {:?}", started.elapsed());
    assert_eq!(fleet.object_count().await, 0, "nothing of it is kept");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_house_is_refused_before_the_body_is_read() {
    let fleet = TestFleet::spawn_with(|s| s.max_uploads_in_flight = 1).await;
    let head = upload_head(&fleet, 1000);
    let holder = send_raw(&fleet, format!("{head}transaction_id").as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // headers only: the answer comes without a byte of body sent
    let mut second = send_raw(&fleet, head.as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await.expect("answered").unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after:") && answer.contains("\"error\":\"busy\""), "{answer}");
    drop(holder);
    let ok = eventually(Duration::from_secs(10), async || {
        fleet.post_upload(valid_csv("after", 2), "text/csv").await.status() == 202
    })
    .await;
    assert!(ok, "the slot is free again once the stalled client is gone");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_ends_is_cut_off() {
    let fleet = TestFleet::spawn_with(|s| s.header_read_timeout_ms = 500).await;
    let (k, v) = fleet.key_header();
    let mut s = send_raw(&fleet, format!("GET /healthz HTTP/1.1\r\n{k}: {v}\r\nHost: x").as_bytes()).await;
    // and one that never sends a byte
    let mut silent = TcpStream::connect(fleet.addr()).await.unwrap();
    let started = Instant::now();
    assert!(read_until_closed(&mut s, Duration::from_secs(5)).await.is_some(), "closed");
    assert!(read_until_closed(&mut silent, Duration::from_secs(5)).await.is_some(), "silent one closed");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_others_close() {
    const CAP: usize = 4;
    let fleet = TestFleet::spawn_with(|s| {
        s.max_connections = CAP;
        s.max_uploads_in_flight = CAP;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(TcpStream::connect(fleet.addr()).await.unwrap());
    }
    let probe = reqwest::Client::builder().timeout(Duration::from_millis(800)).build().unwrap();
    let url = format!("{}/healthz", fleet.base_url);
    assert!(probe.get(&url).send().await.is_err(), "past the cap a connection is not served");
    drop(held);
    let served = eventually(Duration::from_secs(10), async || probe.get(&url).send().await.is_ok()).await;
    assert!(served, "served once connections are free");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_right_after_its_body_still_gets_its_file_processed() {
    const CLIENTS: usize = 5;
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    for i in 0..CLIENTS {
        let body = valid_csv(&format!("gone{i}"), 20);
        let mut s = send_raw(&fleet, format!("{}{body}", upload_head(&fleet, body.len())).as_bytes()).await;
        // closes both directions at once: the answer is never read
        let _ = s.shutdown().await;
        drop(s);
    }
    let mut completed = Vec::new();
    while completed.len() < CLIENTS {
        let n = tap.next(Duration::from_secs(60)).await.expect("every upload completes");
        assert_eq!(n.routing_key, "file.completed", "{n:?}");
        completed.push(n.body.file_id);
    }
    for id in &completed {
        // the notification goes out before the status is recorded (see the notifier)
        fleet.wait_for_status(*id, &[FileStatus::Completed]).await;
    }
    assert_eq!(fleet.object_count().await, CLIENTS);
    assert_eq!(fleet.unannounced().await, vec![]);
    fleet.shutdown().await;
}

/// A stored object and a record that was never announced, as a gateway that crashed between
/// the two would leave them.
async fn orphan(fleet: &TestFleet) -> StatusRecord {
    let file_id = FileId::new();
    let key = fleet.names.object_key(&file_id);
    let body = valid_csv("orphan", 2).into_bytes();
    let stream = futures::stream::iter([Ok(bytes::Bytes::from(body))]);
    let size = fleet.deps.storage.objects.put(&key, Box::pin(stream)).await.unwrap();
    let mut record = StatusRecord::uploaded(file_id, key, size, chrono::Utc::now());
    record.announced = false;
    fleet.deps.storage.statuses.create(&record).await.unwrap();
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_withdraws_an_upload_that_was_never_announced() {
    let fleet = TestFleet::spawn_with(|s| s.unannounced_sweep_after_ms = 1000).await;
    let lost = orphan(&fleet).await;
    let kept = fleet.upload(valid_csv("kept", 2)).await.file_id;
    let statuses = fleet.deps.storage.statuses.clone();
    let gone = eventually(Duration::from_secs(15), async || statuses.get(lost.file_id).await.unwrap().is_none()).await;
    assert!(gone, "the unannounced record is withdrawn");
    assert!(eventually(Duration::from_secs(5), async || fleet.object_count().await == 1).await, "and its object");
    fleet.wait_for_status(kept, &[FileStatus::Completed]).await;
    assert_eq!(fleet.unannounced().await, vec![]);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_json_errors_and_pages_stop_at_a_byte_budget() {
    let fleet = TestFleet::spawn_with(|s| s.max_page_bytes = 1024).await;
    let id = fleet.upload(valid_csv("page", 30)).await.file_id;
    fleet.wait_for_status(id, &[FileStatus::Completed]).await;
    let cases = [
        ("GET", format!("/files/{id}/transactions?cursor=0%C3%A90"), 400, "bad_request"),
        ("GET", format!("/files/{id}/transactions?limit=1&limit=2"), 400, "bad_request"),
        ("GET", format!("/files/{id}/transactions?limit=%FF"), 400, "bad_request"),
        ("GET", format!("/files/{id}/transactions?limit=0"), 400, "bad_request"),
        ("GET", "/files/%FF%FE".to_owned(), 400, "bad_request"),
        ("GET", "/files/not-an-id".to_owned(), 404, "not_found"),
        ("GET", "/nowhere".to_owned(), 404, "not_found"),
        ("DELETE", "/upload".to_owned(), 405, "method_not_allowed"),
    ];
    for (method, path, status, code) in cases {
        let resp = fleet
            .http
            .request(method.parse().unwrap(), format!("{}{path}", fleet.base_url))
            .send()
            .await
            .expect("answered, not dropped");
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert!(resp.headers().contains_key("x-request-id"), "{method} {path}");
        let body: serde_json::Value = resp.json().await.expect("JSON body");
        assert_eq!(body["error"], code, "{method} {path}: {body}");
        assert!(body["message"].is_string(), "{body}");
    }
    let first = fleet.get_ok(&format!("/files/{id}/transactions?limit=100")).await;
    let n = first["items"].as_array().unwrap().len();
    assert!((1..30).contains(&n), "a page stops at the byte budget: {n} items");
    assert!(first["next_cursor"].is_string());
    let all = fleet.transactions(id, 100).await;
    assert_eq!(all.len(), 30, "following the cursors still gives every row");
    fleet.shutdown().await;
}
