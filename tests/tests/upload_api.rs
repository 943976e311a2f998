//! Uploads as their users check them (issue 10): `Idempotency-Key` (a repeat gets the first
//! answer and nothing is stored twice, across gateway replicas; another file under the same key
//! is a 422; another API key's same key is its own) and `Prefer: wait=N` (the answer waits for
//! the verdict: 200 valid, 422 invalid with its errors, `until=completed` for the final status,
//! 202 when the time runs out), against the real broker and over real HTTP.

use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use txpipe_common::auth::KeyLimits;
use txpipe_common::status::FileStatus;
use txpipe_common::{Deps, Settings};
use txpipe_tests::{valid_csv, TestFleet, UNLIMITED};

/// A CSV whose one row has a bad currency.
fn invalid_csv() -> String {
    "transaction_id,amount,currency,timestamp,merchant,status\nbad-1,1.00,usd,2024-01-15T10:30:00Z,M,completed\n"
        .to_owned()
}

/// POSTs `csv` to `{base}/upload{query}` with `key` and the given extra headers.
async fn post(base: &str, key: &str, query: &str, headers: &[(&str, &str)], csv: String) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .request(Method::POST, format!("{base}/upload{query}"))
        .header(txpipe_common::auth::KEY_HEADER, key)
        .header("content-type", "text/csv");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(csv).send().await.expect("gateway reachable")
}

/// The status, the headers we look at, and the JSON body of an answer.
async fn answer(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

/// The file ids of the caller's files (`GET /files`).
async fn listed(fleet: &TestFleet, key: &str) -> Vec<String> {
    let (code, body) = fleet.get_as(Some(key), "/files").await;
    assert_eq!(code, 200, "{body}");
    body["items"].as_array().unwrap().iter().map(|f| f["file_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_repeated_idempotency_key_gets_the_first_answer_and_stores_nothing_twice() {
    let fleet = TestFleet::spawn().await;
    let base = fleet.base_url.clone();
    // two uploads a day: a repeat must not use one up
    let alice = fleet.new_key("idem-alice", false, KeyLimits { daily_quota: 2, ..UNLIMITED }).await;
    let bob = fleet.new_key("idem-bob", false, UNLIMITED).await;
    let csv = valid_csv("idem", 5);
    let key = [("idempotency-key", "8e03978e-40d5-43e8-bc93-6894a57f9324")];

    let (code, headers, first) = answer(post(&base, &alice, "", &key, csv.clone()).await).await;
    assert_eq!(code, 202, "{first}");
    assert!(headers.get("idempotent-replayed").is_none());
    let file_id = first["file_id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let (code, headers, again) = answer(post(&base, &alice, "", &key, csv.clone()).await).await;
        assert_eq!(code, 202, "{again}");
        assert_eq!(again, first, "the first answer, whole");
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(headers["location"], format!("/files/{file_id}").as_str());
    }
    // the draft's quoted form is the same key
    let quoted = [("idempotency-key", "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"")];
    let (code, _, again) = answer(post(&base, &alice, "", &quoted, csv.clone()).await).await;
    assert_eq!((code, &again["file_id"]), (202, &first["file_id"]));

    let done = fleet.wait_for_status(file_id.parse().unwrap(), &[FileStatus::Completed]).await;
    assert_eq!(done.records_processed, Some(5));
    assert_eq!(listed(&fleet, &alice).await, vec![file_id.clone()], "one file listed");
    assert_eq!(fleet.object_count().await, 1, "one object stored");

    // the same key for another file, or the same file with other options: 422, nothing stored
    let (code, _, refused) = answer(post(&base, &alice, "", &key, valid_csv("other", 5)).await).await;
    assert_eq!((code, refused["error"].as_str()), (422, Some("idempotency_key_reused")), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("another file"), "{refused}");
    let (code, _, refused) = answer(post(&base, &alice, "?mode=partial", &key, csv.clone()).await).await;
    assert_eq!((code, refused["error"].as_str()), (422, Some("idempotency_key_reused")), "{refused}");

    // another API key's same Idempotency-Key is its own
    let (code, _, bobs) = answer(post(&base, &bob, "", &key, csv.clone()).await).await;
    assert_eq!(code, 202, "{bobs}");
    assert_ne!(bobs["file_id"], first["file_id"]);
    assert_eq!(fleet.object_count().await, 2);

    // the repeats did not use up alice's quota: her second upload of the day is taken
    let (code, headers, second) =
        answer(post(&base, &alice, "", &[("idempotency-key", "k2")], valid_csv("second", 2)).await).await;
    assert_eq!(code, 202, "{second}");
    assert_eq!(headers["x-quota-remaining"], "0");

    // a malformed key is a 400 in the usual shape, before anything is read or counted
    let long = "k".repeat(256);
    for bad in ["", "a b", long.as_str(), "\"\""] {
        let (code, _, err) = answer(post(&base, &alice, "", &[("idempotency-key", bad)], csv.clone()).await).await;
        assert_eq!((code, err["error"].as_str()), (400, Some("bad_request")), "{bad:?}: {err}");
        assert!(err["message"].as_str().unwrap().contains("Idempotency-Key"), "{err}");
    }
    let resp = reqwest::Client::new()
        .post(format!("{base}/upload"))
        .header(txpipe_common::auth::KEY_HEADER, &alice)
        .header("content-type", "text/csv")
        .header("idempotency-key", reqwest::header::HeaderValue::from_bytes("clé".as_bytes()).unwrap())
        .body(csv.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(fleet.object_count().await, 3);
    fleet.shutdown().await;
}

#[tokio::test]
async fn concurrent_uploads_with_one_key_store_one_file() {
    let fleet = TestFleet::spawn().await;
    let key = fleet.new_key("idem-race", false, UNLIMITED).await;
    let csv = valid_csv("race", 500);
    let tries = (0..6).map(|_| {
        let (base, key, csv) = (fleet.base_url.clone(), key.clone(), csv.clone());
        tokio::spawn(async move { answer(post(&base, &key, "", &[("idempotency-key", "race-1")], csv).await).await })
    });
    let answers: Vec<_> = futures::future::join_all(tries).await.into_iter().map(|r| r.unwrap()).collect();
    let accepted: Vec<&Value> = answers.iter().filter(|(c, _, _)| *c == 202).map(|(_, _, b)| &b["file_id"]).collect();
    assert!(!accepted.is_empty(), "{answers:?}");
    assert!(accepted.iter().all(|id| *id == accepted[0]), "one file id for every 202: {answers:?}");
    for (code, headers, body) in &answers {
        if *code == 409 {
            assert_eq!(body["error"], "idempotency_key_in_use", "{body}");
            assert_eq!(headers["retry-after"], "1");
        } else {
            assert_eq!(*code, 202, "{body}");
        }
    }
    // the client retries after a 409: the first answer
    let (code, _, again) = answer(post(&fleet.base_url, &key, "", &[("idempotency-key", "race-1")], csv).await).await;
    assert_eq!((code, &again["file_id"]), (202, accepted[0]));
    let file_id = accepted[0].as_str().unwrap();
    fleet.wait_for_status(file_id.parse().unwrap(), &[FileStatus::Completed]).await;
    assert_eq!(listed(&fleet, &key).await, vec![file_id.to_owned()]);
    assert_eq!(fleet.object_count().await, 1);
    fleet.shutdown().await;
}

#[tokio::test]
async fn an_upload_can_wait_for_its_verdict() {
    let fleet = TestFleet::spawn().await;
    let base = fleet.base_url.clone();
    let key = fleet.new_key("waiter", false, UNLIMITED).await;
    let wait = [("prefer", "wait=30")];

    // valid: 200 with the status record, as GET /files/{id} shows it
    let (code, headers, record) = answer(post(&base, &key, "", &wait, valid_csv("w", 4)).await).await;
    assert_eq!(code, 200, "{record}");
    assert_eq!(headers["preference-applied"], "wait=30");
    let status = FileStatus::parse(record["status"].as_str().unwrap()).unwrap();
    assert!(status.is_at_or_past(FileStatus::Validated) && status != FileStatus::ValidationFailed, "{record}");
    assert_eq!(record["row_count"], 4);
    let file_id = record["file_id"].as_str().unwrap();
    assert_eq!(headers["location"], format!("/files/{file_id}").as_str());
    assert!(record["history"].as_array().unwrap().len() >= 3, "the whole record: {record}");

    // invalid: 422 with the errors
    let (code, headers, record) = answer(post(&base, &key, "", &wait, invalid_csv()).await).await;
    assert_eq!(code, 422, "{record}");
    assert_eq!(headers["preference-applied"], "wait=30");
    assert_eq!(record["status"], "validation_failed");
    assert_eq!(record["error_count"], 1);
    assert_eq!(record["errors"][0]["column"], "currency", "{record}");

    // until=completed: the final status
    let (code, _, record) = answer(post(&base, &key, "?until=completed", &wait, valid_csv("c", 6)).await).await;
    assert_eq!(code, 200, "{record}");
    assert_eq!(record["status"], "completed");
    assert_eq!(record["records_processed"], 6);
    let (code, _, record) = answer(post(&base, &key, "?until=completed", &wait, invalid_csv()).await).await;
    assert_eq!((code, &record["status"]), (422, &Value::from("validation_failed")));
    // the answer follows the file's `file.completed`, although that event comes a moment
    // before the record says completed: not the fallback read 2 s later
    let mut fastest = Duration::MAX;
    for n in 0..3 {
        let started = Instant::now();
        let (code, _, record) =
            answer(post(&base, &key, "?until=completed", &wait, valid_csv(&format!("q{n}"), 1)).await).await;
        assert_eq!((code, &record["status"]), (200, &Value::from("completed")), "{record}");
        fastest = fastest.min(started.elapsed());
    }
    assert!(fastest < Duration::from_millis(1500), "answered {fastest:?} after the upload at best");
    let (code, _, err) = answer(post(&base, &key, "?until=soon", &wait, valid_csv("x", 1)).await).await;
    assert_eq!((code, err["error"].as_str()), (400, Some("bad_request")));

    // a repeated Idempotency-Key waits for the first upload's file
    let both = [("prefer", "wait=30"), ("idempotency-key", "wait-and-repeat")];
    let (code, _, first) = answer(post(&base, &key, "?until=completed", &both, valid_csv("r", 2)).await).await;
    assert_eq!((code, &first["status"]), (200, &Value::from("completed")), "{first}");
    let (code, headers, again) = answer(post(&base, &key, "?until=completed", &both, valid_csv("r", 2)).await).await;
    assert_eq!((code, &again["file_id"]), (200, &first["file_id"]), "{again}");
    assert_eq!(headers["idempotent-replayed"], "true");

    // no Prefer: the usual 202, no Preference-Applied
    let (code, headers, _) = answer(post(&base, &key, "", &[], valid_csv("n", 1)).await).await;
    assert_eq!(code, 202);
    assert!(headers.get("preference-applied").is_none());
    fleet.shutdown().await;
}

/// A gateway alone (no workers: nothing is ever decided) on its own namespace and storage.
struct LoneGateway {
    base: String,
    deps: Deps,
    key: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), txpipe_ingest_gateway::GatewayError>>,
    aws: Option<(Settings, aws_config::SdkConfig)>,
    _dir: tempfile::TempDir,
}

impl LoneGateway {
    async fn spawn(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = txpipe_tests::test_settings(dir.path());
        tweak(&mut settings);
        let (deps, aws) = if std::env::var("TXPIPE_TEST_STORAGE").as_deref() == Ok("aws") {
            settings.storage = txpipe_common::config::StorageKind::Aws;
            let (sdk, storage) = txpipe_tests::aws::provisioned(&settings).await;
            (Deps::with_storage(settings.clone(), storage).await.unwrap(), Some((settings, sdk)))
        } else {
            (Deps::connect(settings).await.unwrap(), None)
        };
        let key = txpipe_tests::new_key(&deps, "lone", false, UNLIMITED).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(txpipe_ingest_gateway::run(listener, deps.clone(), stop.clone().cancelled_owned()));
        for _ in 0..200 {
            if reqwest::get(format!("{base}/readyz")).await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Self { base, deps, key, stop, task, aws, _dir: dir }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        let stopped =
            tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("the gateway stops in time");
        stopped.unwrap().unwrap();
        match &self.aws {
            Some((settings, sdk)) => txpipe_tests::aws::teardown(settings, sdk).await,
            None => self.deps.broker.teardown().await.unwrap(),
        }
        self.deps.broker.close().await;
    }
}

#[tokio::test]
async fn a_wait_that_runs_out_is_the_usual_202_and_holds_an_upload_slot() {
    let gw = LoneGateway::spawn(|s| s.max_uploads_in_flight = 1).await;
    let started = Instant::now();
    let (code, headers, body) =
        answer(post(&gw.base, &gw.key, "", &[("prefer", "wait=2")], valid_csv("late", 1)).await).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(headers["preference-applied"], "wait=2");
    assert_eq!(body["status"], "uploaded");
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited");
    assert!(started.elapsed() < Duration::from_secs(10), "and no longer");

    // while one upload waits, it holds the only slot: another is refused before its body
    let (base, key) = (gw.base.clone(), gw.key.clone());
    let waiting =
        tokio::spawn(
            async move { answer(post(&base, &key, "", &[("prefer", "wait=4")], valid_csv("a", 1)).await).await },
        );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, _, busy) = answer(post(&gw.base, &gw.key, "", &[], valid_csv("b", 1)).await).await;
    assert_eq!((code, busy["error"].as_str()), (503, Some("busy")), "{busy}");
    assert_eq!(waiting.await.unwrap().0, 202);
    let (code, _, _) = answer(post(&gw.base, &gw.key, "", &[], valid_csv("c", 1)).await).await;
    assert_eq!(code, 202, "the slot is free again");

    // at shutdown a wait answers at once
    let (base, key) = (gw.base.clone(), gw.key.clone());
    let waiting =
        tokio::spawn(
            async move { answer(post(&base, &key, "", &[("prefer", "wait=60")], valid_csv("d", 1)).await).await },
        );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopping = Instant::now();
    gw.stop.cancel();
    let (code, headers, _) = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert_eq!((code, &headers["preference-applied"]), (202, &reqwest::header::HeaderValue::from_static("wait=60")));
    assert!(stopping.elapsed() < Duration::from_secs(10));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_second_gateway_replica_shares_the_keys_and_hears_the_verdicts() {
    let fleet = TestFleet::spawn().await;
    // a second gateway on the same namespace, with its own broker connection and storage handle
    let deps = Deps::with_storage(fleet.settings.clone(), fleet.second_storage().await).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(txpipe_ingest_gateway::run(listener, deps.clone(), stop.clone().cancelled_owned()));
    let key = fleet.new_key("replicas", false, UNLIMITED).await;
    let csv = valid_csv("rep", 3);
    let idem = [("idempotency-key", "across-replicas")];

    let (code, _, first) = answer(post(&fleet.base_url, &key, "", &idem, csv.clone()).await).await;
    assert_eq!(code, 202, "{first}");
    let mut replayed = None;
    for _ in 0..100 {
        let resp = post(&second, &key, "", &idem, csv.clone()).await;
        if resp.status() != 503 {
            replayed = Some(answer(resp).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // the second gateway still starting
    }
    let (code, headers, again) = replayed.expect("the second gateway answers");
    assert_eq!((code, &again), (202, &first), "the first answer, from the other replica");
    assert_eq!(headers["idempotent-replayed"], "true");

    // an upload waiting on either replica hears its verdict
    for base in [&fleet.base_url, &second] {
        let (code, _, record) =
            answer(post(base, &key, "?until=completed", &[("prefer", "wait=30")], valid_csv("v", 2)).await).await;
        assert_eq!((code, &record["status"]), (200, &Value::from("completed")), "{base}: {record}");
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap().unwrap();
    deps.broker.close().await;
    assert_eq!(fleet.object_count().await, 3);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_repeat_while_the_first_upload_streams_gets_409_then_the_first_answer() {
    let gw = LoneGateway::spawn(|_| {}).await;
    let csv = valid_csv("slow", 20);
    let (head, tail) = csv.split_at(40);
    let (head, tail) = (bytes::Bytes::from(head.to_owned()), bytes::Bytes::from(tail.to_owned()));
    // the first upload sends part of its body, then pauses: it holds the key meanwhile
    let slow = futures::stream::iter([Ok::<_, std::io::Error>(head), Ok(tail)]).then(|chunk| async move {
        if chunk.as_ref().is_ok_and(|c| !c.starts_with(b"transaction_id")) {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        chunk
    });
    let first = reqwest::Client::new()
        .post(format!("{}/upload", gw.base))
        .header(txpipe_common::auth::KEY_HEADER, &gw.key)
        .header("content-type", "text/csv")
        .header("idempotency-key", "slow-1")
        .body(reqwest::Body::wrap_stream(slow))
        .send();
    let first = tokio::spawn(async move { answer(first.await.unwrap()).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (code, headers, busy) =
        answer(post(&gw.base, &gw.key, "", &[("idempotency-key", "slow-1")], csv.clone()).await).await;
    assert_eq!((code, busy["error"].as_str()), (409, Some("idempotency_key_in_use")), "{busy}");
    assert_eq!(headers["retry-after"], "1");
    let (code, _, first) = first.await.unwrap();
    assert_eq!(code, 202, "{first}");
    let (code, _, again) = answer(post(&gw.base, &gw.key, "", &[("idempotency-key", "slow-1")], csv).await).await;
    assert_eq!((code, &again), (202, &first));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_waiting_upload_is_woken_by_the_event_not_by_polling() {
    use txpipe_common::messages::StageMessage;
    use txpipe_common::stage::RoutingKey;
    use txpipe_common::status::StatusUpdate;
    let gw = LoneGateway::spawn(|_| {}).await;
    for round in 0..3 {
        let (base, key) = (gw.base.clone(), gw.key.clone());
        let waiting = tokio::spawn(async move {
            let resp = post(&base, &key, "", &[("prefer", "wait=20")], valid_csv(&format!("ev{round}"), 1)).await;
            (Instant::now(), answer(resp).await)
        });
        // the upload is announced, and its wait has read the status (uploaded) once
        let file_id = loop {
            let query = txpipe_common::storage::FileQuery {
                owner: Some("lone".into()),
                status: Some(FileStatus::Uploaded),
                since: None,
                limit: 10,
                cursor: None,
            };
            if let Some(r) = gw.deps.storage.statuses.list(&query).await.unwrap().items.into_iter().next() {
                break r.file_id;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // as the validator would: the verdict stored, then file.validated published
        let statuses = &gw.deps.storage.statuses;
        let now = chrono::Utc::now();
        statuses.advance(file_id, FileStatus::Validating, StatusUpdate::default(), now).await.unwrap();
        let update = StatusUpdate { row_count: Some(1), ..Default::default() };
        let record = match statuses.advance(file_id, FileStatus::Validated, update, now).await.unwrap() {
            txpipe_common::storage::Advance::Moved(r) => r,
            other => panic!("{other:?}"),
        };
        let published = Instant::now();
        let event = StageMessage::from_record(RoutingKey::FileValidated, &record).outgoing(&gw.deps.names);
        gw.deps.publisher.publish(&event).await.expect("routed to the gateway's own queue");
        let (answered, (code, _, body)) = waiting.await.unwrap();
        assert_eq!((code, &body["status"]), (200, &Value::from("validated")), "{body}");
        // the fallback read is 2 s after the first one, at least 1.7 s after the event
        let took = answered.saturating_duration_since(published);
        assert!(took < Duration::from_millis(1000), "round {round}: answered {took:?} after the event");
    }
    gw.shutdown().await;
}
