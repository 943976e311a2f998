//! The four services as separate processes on S3/DynamoDB (moto), as a split deployment runs
//! them: the validator's and the transformer's claims start from the record their message
//! carried (`stored` in `file.uploaded` and `file.validated`), so in steady state only the
//! notifier reads a status record (one GetItem a file), which each process's
//! `txpipe_storage_calls_total` shows.
//!
//! Needs the binaries built (`cargo build --workspace --bins`; `scripts/test` does it).

use std::collections::HashMap;
use std::time::Duration;
use tokio::process::Child;
use txpipe_tests::procs::{command, stop, wait_for_log};

/// One service of the split deployment on moto, and where its `/metrics` is.
struct Service {
    name: &'static str,
    child: Child,
    metrics: String,
}

async fn spawn(name: &'static str, settings: &txpipe_common::Settings, dir: &std::path::Path) -> Service {
    let mut child = command(name, &settings.namespace, dir)
        .env("TXPIPE_STORAGE", "aws")
        .env("AWS_ENDPOINT_URL", txpipe_tests::aws::endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("TXPIPE_RETRY_INITIAL_DELAY_MS", "20")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let wanted =
        if name == "ingest-gateway" { "gateway listening" } else { "health endpoints on /healthz and /readyz" };
    let line = wait_for_log(&mut child, wanted).await;
    let addr = line["fields"]["addr"].as_str().unwrap().to_owned();
    Service { name, child, metrics: format!("http://{addr}/metrics") }
}

/// The service's storage calls so far, by `service/operation`.
async fn calls(http: &reqwest::Client, s: &Service) -> HashMap<String, f64> {
    let text = http.get(&s.metrics).send().await.unwrap().error_for_status().unwrap().text().await.unwrap();
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        Some(line[start..].split('"').next()?.to_owned())
    };
    text.lines()
        .filter(|l| l.starts_with("txpipe_storage_calls_total{"))
        .filter_map(|l| {
            let key = format!("{}/{}", label(l, "service")?, label(l, "operation")?);
            Some((key, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

fn get_items(c: &HashMap<String, f64>) -> f64 {
    c.get("dynamodb/GetItem").copied().unwrap_or(0.0)
}

#[tokio::test]
async fn split_services_on_aws_claim_on_carried_records_and_only_the_notifier_reads() {
    let (dir, settings, sdk, storage) = txpipe_tests::aws::fresh().await;
    let (_, key) =
        txpipe_common::auth::create_key(storage.keys.as_ref(), "split", true, txpipe_tests::UNLIMITED).await.unwrap();
    let http = txpipe_tests::client_with_key(key.expose());

    let gateway = spawn("ingest-gateway", &settings, dir.path()).await;
    let base = gateway.metrics.trim_end_matches("/metrics").to_owned();
    let mut services = vec![gateway];
    for name in ["validator", "transformer", "notifier"] {
        services.push(spawn(name, &settings, dir.path()).await);
    }
    // every worker consuming before the first upload
    for s in &services[1..] {
        let ready = s.metrics.replace("/metrics", "/readyz");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !http.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            assert!(tokio::time::Instant::now() < deadline, "{} never ready", s.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // a scrape costs a GetItem itself (its key is looked up): measure what two cost with
    // nothing happening in between, and take it off
    let mut before = Vec::new();
    let mut scrape = Vec::new();
    for s in &services {
        let first = calls(&http, s).await;
        let second = calls(&http, s).await;
        scrape.push(get_items(&second) - get_items(&first));
        before.push(second);
    }

    let files = 8;
    let mut ids = Vec::new();
    for i in 0..files {
        let body = txpipe_tests::valid_csv(&format!("split-{i}"), 20);
        let r = http.post(format!("{base}/upload")).header("content-type", "text/csv").body(body).send().await.unwrap();
        assert_eq!(r.status(), 202);
        ids.push(r.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        txpipe_tests::wait_http_status(&http, &base, id, &["completed"], txpipe_tests::WAIT).await;
    }

    let mut reads = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        let after = calls(&http, s).await;
        reads.insert(s.name, get_items(&after) - get_items(&before[i]) - scrape[i]);
    }
    // the gateway's GET /files/{id} above read records too: only the workers are counted.
    // Without the carried records the validator and the transformer read once a file each;
    // with them, none (a retry under a loaded machine may add one, hence the margin)
    let files = files as f64;
    assert!(reads["validator"] <= 2.0, "the validator's claims start from the carried records: {reads:?}");
    assert!(reads["transformer"] <= 2.0, "so do the transformer's: {reads:?}");
    assert!(
        (files..=files + 2.0).contains(&reads["notifier"]),
        "the notifier reads each file once, by design: {reads:?}"
    );

    for s in services {
        stop(s.child).await;
    }
    txpipe_tests::aws::teardown(&settings, &sdk).await;
}
