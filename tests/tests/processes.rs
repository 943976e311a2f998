//! The same code as separate processes: the four binaries, several copies of each worker,
//! sharing one broker namespace and one data directory (SQLite across processes).
//!
//! Needs the binaries built (`cargo build --workspace --bins`; `scripts/test` does it).

use std::time::Duration;
use tokio::process::Child;
use txpipe_tests::procs::{command, stop, wait_for_log};

fn spawn(name: &str, ns: &str, data_dir: &std::path::Path) -> Child {
    let mut cmd = command(name, ns, data_dir);
    cmd.env("TXPIPE_RETRY_INITIAL_DELAY_MS", "20")
        // a copy redelivered after a kill -9 waits this long for the killed attempt's heartbeat
        // to go stale before it takes the file over
        .env("TXPIPE_STUCK_AFTER_MS", "2000");
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// An admin key made in the storage the processes share (`dir`, namespace `ns`), and a client
/// that sends it.
async fn keyed_client(ns: &str, dir: &std::path::Path) -> (String, reqwest::Client) {
    let mut settings = txpipe_tests::test_settings(dir);
    settings.namespace = ns.to_owned();
    let storage = txpipe_common::storage::Storage::open(&settings).await.unwrap();
    let limits = txpipe_tests::UNLIMITED;
    let (_, key) = txpipe_common::auth::create_key(storage.keys.as_ref(), "processes", true, limits).await.unwrap();
    let key = key.expose().to_owned();
    let client = txpipe_tests::client_with_key(&key);
    (key, client)
}

#[tokio::test]
async fn separate_binaries_with_several_copies_share_one_broker_and_storage() {
    let dir = tempfile::tempdir().unwrap();
    let ns = txpipe_tests::fresh_namespace();
    let mut gateway = spawn("ingest-gateway", &ns, dir.path());
    let listening = wait_for_log(&mut gateway, "gateway listening").await;
    let base = format!("http://{}", listening["fields"]["addr"].as_str().unwrap());

    let (key, http) = keyed_client(&ns, dir.path()).await;
    let mut workers = Vec::new();
    for name in ["validator", "validator", "transformer", "transformer", "notifier", "notifier"] {
        let mut child = spawn(name, &ns, dir.path());
        // the health server starts before consuming; readyz says when the worker is connected
        let health = wait_for_log(&mut child, "health endpoints on /healthz and /readyz").await;
        let addr = health["fields"]["addr"].as_str().unwrap().to_owned();
        for path in ["healthz", "readyz"] {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let r = http.get(format!("http://{addr}/{path}")).send().await;
                if r.as_ref().is_ok_and(|r| r.status() == 200) {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "{name} /{path} never answered 200: {r:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // a worker's /metrics needs a key too, checked in the storage it shares
        let metrics = format!("http://{addr}/metrics");
        assert_eq!(reqwest::get(&metrics).await.unwrap().status(), 401, "{name} /metrics without a key");
        let r = reqwest::Client::new().get(&metrics).bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name} /metrics with a bearer key");
        workers.push(child);
    }
    let mut ids = Vec::new();
    for i in 0..8 {
        let body = if i == 3 {
            "transaction_id,amount,currency,timestamp,merchant,status\nbad,1,USD,never,m,completed\n".to_string()
        } else {
            txpipe_tests::valid_csv(&format!("p{i}"), 200)
        };
        let r = http.post(format!("{base}/upload")).header("content-type", "text/csv").body(body).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let v: serde_json::Value = r.json().await.unwrap();
        ids.push(v["file_id"].as_str().unwrap().to_owned());
    }
    for (i, id) in ids.iter().enumerate() {
        let want = if i == 3 { "validation_failed" } else { "completed" };
        let deadline = tokio::time::Instant::now() + txpipe_tests::WAIT;
        loop {
            let v: serde_json::Value =
                http.get(format!("{base}/files/{id}")).send().await.unwrap().json().await.unwrap();
            if v["status"] == want {
                if want == "completed" {
                    assert_eq!(v["records_processed"], 200);
                }
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "file {i} stuck: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // SIGTERM: every process stops cleanly
    for child in workers {
        assert!(stop(child).await.success(), "a worker exited non-zero after SIGTERM");
    }
    assert!(stop(gateway).await.success(), "the gateway exited non-zero after SIGTERM");

    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.namespace = ns;
    let broker = txpipe_common::amqp::Broker::connect(&settings).await.unwrap();
    broker.teardown().await.unwrap();
}

/// A gateway process and its base URL.
async fn start_gateway(ns: &str, dir: &std::path::Path) -> (Child, String) {
    let mut gateway = spawn("ingest-gateway", ns, dir);
    let listening = wait_for_log(&mut gateway, "gateway listening").await;
    (gateway, format!("http://{}", listening["fields"]["addr"].as_str().unwrap()))
}

/// A worker process, once it consumes.
async fn start_worker(name: &str, ns: &str, dir: &std::path::Path) -> Child {
    let mut child = spawn(name, ns, dir);
    wait_for_log(&mut child, "consuming").await;
    child
}

async fn upload(http: &reqwest::Client, base: &str, body: String) -> String {
    let r = http.post(format!("{base}/upload")).header("content-type", "text/csv").body(body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    r.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().to_owned()
}

async fn status(http: &reqwest::Client, base: &str, id: &str) -> serde_json::Value {
    txpipe_tests::http_status(http, base, id).await
}

async fn wait_status(http: &reqwest::Client, base: &str, id: &str, want: &str, within: Duration) -> serde_json::Value {
    txpipe_tests::wait_http_status(http, base, id, &[want], within).await
}

/// Rows stored for a file, counted through the API (and checked to be distinct).
async fn stored_rows(http: &reqwest::Client, base: &str, id: &str) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut cursor = String::new();
    loop {
        let v: serde_json::Value = http
            .get(format!("{base}/files/{id}/transactions?limit=1000{cursor}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for t in v["items"].as_array().unwrap() {
            assert!(seen.insert(t["transaction_id"].as_str().unwrap().to_owned()), "a row listed twice");
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return seen.len(),
        }
    }
}

async fn dlq_count(ns: &str) -> u32 {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.namespace = ns.to_owned();
    let broker = txpipe_common::amqp::Broker::connect(&settings).await.unwrap();
    let n = txpipe_cli::dlq::count(&broker).await.unwrap();
    broker.teardown().await.unwrap();
    broker.close().await;
    n
}

#[tokio::test]
async fn killing_the_transformer_mid_file_again_and_again_loses_nothing_and_writes_nothing_twice() {
    const ROWS: usize = 60_000;
    const KILLS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let ns = txpipe_tests::fresh_namespace();
    let (gateway, base) = start_gateway(&ns, dir.path()).await;
    let validator = start_worker("validator", &ns, dir.path()).await;
    let notifier = start_worker("notifier", &ns, dir.path()).await;
    let mut transformer = start_worker("transformer", &ns, dir.path()).await;
    let (_, http) = keyed_client(&ns, dir.path()).await;

    let big = upload(&http, &base, txpipe_tests::valid_csv("big", ROWS)).await;
    let small: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(upload(&http, &base, txpipe_tests::valid_csv(&format!("small{i}"), 50)).await);
        }
        v
    };
    let mut kills = 0;
    for _ in 0..KILLS {
        // wait until the big file is being written, then kill -9 the transformer and start another
        // (a restarted transformer can finish it between two looks: then there is nothing left
        // to interrupt)
        let now = txpipe_tests::wait_http_status(
            &http,
            &base,
            &big,
            &["processing", "processed", "completed"],
            Duration::from_secs(60),
        )
        .await;
        if now["status"] != "processing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        if status(&http, &base, &big).await["status"] != "processing" {
            break;
        }
        transformer.start_kill().unwrap();
        transformer.wait().await.unwrap();
        kills += 1;
        transformer = start_worker("transformer", &ns, dir.path()).await;
    }
    let mut completed = 0;
    let mut rows = 0;
    for (id, want) in std::iter::once((&big, ROWS)).chain(small.iter().map(|s| (s, 50))) {
        let v = wait_status(&http, &base, id, "completed", Duration::from_secs(120)).await;
        assert_eq!(v["records_processed"], want);
        let n = stored_rows(&http, &base, id).await;
        assert_eq!(n, want, "every row stored, once");
        rows += n;
        completed += 1;
    }
    for child in [transformer, validator, notifier, gateway] {
        assert!(stop(child).await.success());
    }
    let dlq = dlq_count(&ns).await;
    assert_eq!(dlq, 0);
    eprintln!(
        "chaos a (kill -9 transformer x{kills}): files pushed 5, completed {completed}, lost {}, rows {rows} (duplicates 0), DLQ {dlq}",
        5 - completed
    );
    assert!(kills >= 1, "the big file was never caught in flight");
}

#[tokio::test]
async fn sigterm_during_processing_finishes_the_file_and_exits_zero() {
    const ROWS: usize = 40_000;
    let dir = tempfile::tempdir().unwrap();
    let ns = txpipe_tests::fresh_namespace();
    let (gateway, base) = start_gateway(&ns, dir.path()).await;
    let validator = start_worker("validator", &ns, dir.path()).await;
    let notifier = start_worker("notifier", &ns, dir.path()).await;
    let transformer = start_worker("transformer", &ns, dir.path()).await;
    let (_, http) = keyed_client(&ns, dir.path()).await;
    let id = upload(&http, &base, txpipe_tests::valid_csv("term", ROWS)).await;
    wait_status(&http, &base, &id, "processing", Duration::from_secs(60)).await;
    let exit = stop(transformer).await;
    assert!(exit.success(), "SIGTERM mid-file: exit 0 after finishing ({exit:?})");
    let v = wait_status(&http, &base, &id, "completed", Duration::from_secs(60)).await;
    assert_eq!(v["records_processed"], ROWS);
    assert_eq!(stored_rows(&http, &base, &id).await, ROWS);
    for child in [validator, notifier, gateway] {
        assert!(stop(child).await.success());
    }
    let dlq = dlq_count(&ns).await;
    assert_eq!(dlq, 0);
    eprintln!("chaos f (SIGTERM mid-file): files pushed 1, completed 1, lost 0, rows {ROWS} (duplicates 0), DLQ {dlq}");
}

/// A free port on 127.0.0.1 (bound and released; the process binds it again at once).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test]
async fn metrics_can_be_served_on_their_own_address() {
    let dir = tempfile::tempdir().unwrap();
    let ns = txpipe_tests::fresh_namespace();
    // the metrics address asks for a key too (it need not face the internet, but may)
    let (_, http) = keyed_client(&ns, dir.path()).await;
    for name in ["ingest-gateway", "validator"] {
        let (main, metrics) = (free_addr(), free_addr());
        let mut cmd = command(name, &ns, dir.path());
        cmd.env("TXPIPE_HTTP_ADDR", &main).env("TXPIPE_METRICS_ADDR", &metrics).stderr(std::process::Stdio::null());
        let child = cmd.spawn().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let scraped = loop {
            if let Ok(r) = http.get(format!("http://{metrics}/metrics")).send().await {
                break r;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name}: no metrics on {metrics}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(scraped.status(), 200, "{name}");
        let anonymous = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap();
        assert_eq!(anonymous.status(), 401, "{name}: the metrics address wants a key");
        assert!(scraped.text().await.unwrap().contains("txpipe_"), "{name}");
        let main_metrics = http.get(format!("http://{main}/metrics")).send().await.unwrap();
        assert_eq!(main_metrics.status(), 404, "{name}: /metrics is not on the main address");
        assert_eq!(http.get(format!("http://{main}/healthz")).send().await.unwrap().status(), 200, "{name}");
        assert!(stop(child).await.success(), "{name}");
    }
    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.namespace = ns;
    let broker = txpipe_common::amqp::Broker::connect(&settings).await.unwrap();
    broker.teardown().await.unwrap();
    broker.close().await;
}
