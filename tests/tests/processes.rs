//! The same code as separate processes: the four binaries, several copies of each worker,
//! sharing one broker namespace and one data directory (SQLite across processes).
//!
//! Needs the binaries built (`cargo build --workspace --bins`; `scripts/test` does it).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn binary(name: &str) -> PathBuf {
    // tests run from target/<profile>/deps; the binaries sit one level up
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

fn spawn(name: &str, ns: &str, data_dir: &std::path::Path) -> Child {
    let mut cmd = Command::new(binary(name));
    cmd.env("TXPIPE_NAMESPACE", ns)
        .env("TXPIPE_DATA_DIR", data_dir)
        .env("TXPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("TXPIPE_RETRY_INITIAL_DELAY_MS", "20")
        .env("TXPIPE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Ok(url) = std::env::var("TXPIPE_AMQP_URL") {
        cmd.env("TXPIPE_AMQP_URL", url);
    }
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// Reads the child's JSON log lines until one has `message == wanted`; returns that line.
async fn wait_for_log(child: &mut Child, wanted: &str) -> serde_json::Value {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["fields"]["message"] == wanted {
                    return v;
                }
            }
        }
        panic!("the process ended before logging {wanted:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted:?} log line within 30 s"));
    // keep draining so the child never blocks on a full pipe
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

async fn stop(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().expect("running");
    Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await.unwrap();
    tokio::time::timeout(Duration::from_secs(40), child.wait()).await.expect("exits after SIGTERM").unwrap()
}

#[tokio::test]
async fn separate_binaries_with_several_copies_share_one_broker_and_storage() {
    let dir = tempfile::tempdir().unwrap();
    let ns = txpipe_tests::fresh_namespace();
    let mut gateway = spawn("ingest-gateway", &ns, dir.path());
    let listening = wait_for_log(&mut gateway, "gateway listening").await;
    let base = format!("http://{}", listening["fields"]["addr"].as_str().unwrap());

    let http = reqwest::Client::new();
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
