//! The `txpipe` client commands as people and scripts run them: the built binary as a process
//! against a fleet on its own namespace (the real broker, real HTTP), checking exit statuses,
//! what stdout and stderr say, and the `--json` documents.
//!
//! Needs the `txpipe` binary built (`cargo build -p txpipe-cli`, or `cargo build --workspace
//! --bins`; `scripts/test` does it).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;
use txpipe_common::auth::KeyLimits;
use txpipe_tests::{procs, valid_csv, TestFleet};

/// The most a single `txpipe` command may take (waiting for a file included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// A CSV whose second data row has a bad amount and whose fourth a lower-case currency.
const INVALID: &str = "transaction_id,amount,currency,timestamp,merchant,status\n\
    ok-1,1.00,USD,2024-01-15T10:30:00Z,Acme,completed\n\
    bad-2,ten,USD,2024-01-15T10:30:00Z,Acme,completed\n\
    ok-3,3.00,USD,2024-01-15T10:30:00Z,Acme,pending\n\
    bad-4,4.00,usd,2024-01-15T10:30:00Z,Acme,failed\n";

/// `txpipe ARGS` with `key` (if any) in TXPIPE_API_KEY and nothing else of the caller's
/// environment that could change its answer.
async fn txpipe(args: &[&str], key: Option<&str>) -> Output {
    let mut cmd = tokio::process::Command::new(procs::binary("txpipe"));
    cmd.args(args).env_remove("TXPIPE_API_KEY").stdin(Stdio::null()).kill_on_drop(true);
    if let Some(k) = key {
        cmd.env("TXPIPE_API_KEY", k);
    }
    tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("txpipe {args:?} did not finish within {COMMAND_TIMEOUT:?}"))
        .expect("run txpipe")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit status, showing both streams when it differs.
fn assert_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{what}: exit status\nstdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON document a line ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn upload_wait_status_and_files_against_a_running_fleet() {
    let fleet = TestFleet::spawn_with(|s| s.max_upload_bytes = 64 * 1024).await;
    let base = fleet.base_url.clone();
    let key = fleet.api_key.clone();
    let dir = tempfile::tempdir().unwrap();
    let valid = write(dir.path(), "valid.csv", &valid_csv("cli", 200));
    let invalid = write(dir.path(), "invalid.csv", INVALID);
    let (valid_s, invalid_s) = (valid.to_str().unwrap(), invalid.to_str().unwrap());

    // a valid file: exit 0, and the summary says how many rows were stored
    let o = txpipe(&["upload", "--wait", "--gateway", &base, valid_s], Some(&key)).await;
    assert_exit(&o, 0, "upload --wait of a valid file");
    let text = stdout(&o);
    assert!(text.contains("completed, 200 rows stored"), "{text}");
    let valid_id = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{valid_s}: uploaded as ")))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no file id in {text}"))
        .to_owned();
    assert!(stderr(&o).is_empty(), "no progress or noise on a stderr that is not a terminal: {}", stderr(&o));

    // an invalid file: exit 1, the first error's row and column, and the total
    let o = txpipe(&["upload", "--wait", "--gateway", &base, "--api-key", &key, invalid_s], None).await;
    assert_exit(&o, 1, "upload --wait of an invalid file");
    let text = stdout(&o);
    assert!(text.contains("rejected, 2 problems in 4 rows"), "{text}");
    assert!(text.contains("row 2, column amount: 'ten' is not a decimal amount"), "{text}");
    assert!(text.contains("row 4, column currency"), "{text}");

    // status --json: the gateway's record as it is, on one line
    let o = txpipe(&["status", "--json", "--gateway", &base, &valid_id], Some(&key)).await;
    assert_exit(&o, 0, "status --json");
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["file_id"], valid_id.as_str());
    assert_eq!(lines[0]["status"], "completed");
    assert_eq!(lines[0]["records_processed"], 200);
    let direct = fleet.get_ok(&format!("/files/{valid_id}")).await;
    assert_eq!(lines[0], direct, "the record as the gateway gives it");

    // status (human) and status --watch of a final file: its exit status
    let o = txpipe(&["status", "--gateway", &base, &valid_id], Some(&key)).await;
    assert_exit(&o, 0, "status");
    assert!(stdout(&o).contains("completed") && stdout(&o).contains("200 rows, 200 stored"), "{}", stdout(&o));
    let o = txpipe(&["status", "--watch", "--timeout", "30", "--gateway", &base, &valid_id], Some(&key)).await;
    assert_exit(&o, 0, "status --watch of a completed file");

    // several files at once, for a script: one JSON line each, in order; the worst exit status
    let o = txpipe(&["upload", "--wait", "--json", "--gateway", &base, valid_s, invalid_s], Some(&key)).await;
    assert_exit(&o, 1, "upload --wait --json of a valid and an invalid file");
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2, "{}", stdout(&o));
    assert_eq!(lines[0]["status"], "completed");
    assert_eq!(lines[1]["status"], "validation_failed");
    assert_eq!(lines[1]["error_count"], 2);
    assert_eq!(lines[1]["errors"][0]["row"], 2);
    assert_eq!(lines[1]["errors"][0]["column"], "amount");
    let invalid_id = lines[1]["file_id"].as_str().unwrap().to_owned();
    let o = txpipe(&["status", "--watch", "--gateway", &base, &invalid_id], Some(&key)).await;
    assert_exit(&o, 1, "status --watch of a rejected file");
    assert!(stdout(&o).contains("row 2, column amount"), "{}", stdout(&o));

    // files: the table lists every upload; --json --all every record
    let o = txpipe(&["files", "--gateway", &base], Some(&key)).await;
    assert_exit(&o, 0, "files");
    let text = stdout(&o);
    assert!(text.starts_with("FILE_ID"), "{text}");
    assert_eq!(text.lines().count(), 1 + 4, "a header and the four uploads:\n{text}");
    assert!(text.lines().any(|l| l.starts_with(&valid_id) && l.contains("completed") && l.trim_end().ends_with("200")));
    assert!(text.lines().any(|l| l.starts_with(&invalid_id) && l.contains("validation_failed")));
    let o = txpipe(&["files", "--json", "--all", "--limit", "1", "--gateway", &base], Some(&key)).await;
    assert_exit(&o, 0, "files --json --all");
    let doc = &json_lines(&o)[0];
    assert_eq!(doc["items"].as_array().unwrap().len(), 4, "every page followed: {doc}");
    assert!(doc["next_cursor"].is_null());
    let o = txpipe(&["files", "--status", "validation_failed", "--json", "--gateway", &base], Some(&key)).await;
    assert_exit(&o, 0, "files --status");
    let doc = &json_lines(&o)[0];
    assert_eq!(doc["items"].as_array().unwrap().len(), 2, "{doc}");
    // one page of several: the command for the next keeps the filters, page size and gateway
    let o = txpipe(&["files", "--status", "validation_failed", "--limit", "1", "--gateway", &base], Some(&key)).await;
    assert_exit(&o, 0, "files, one page of two");
    let hint = format!("more files: txpipe files --gateway {base} --status validation_failed --limit 1 --cursor ");
    assert!(stderr(&o).contains(&hint), "{}", stderr(&o));
    // --all with a key allowed one request a second: each page waits for its turn
    let slow = fleet.new_key("slow", true, KeyLimits { daily_quota: 1000, rate_per_second: 1.0, burst: 1 }).await;
    let o = txpipe(&["files", "--json", "--all", "--limit", "1", "--gateway", &base], Some(&slow)).await;
    assert_exit(&o, 0, "files --all at one request a second");
    assert_eq!(json_lines(&o)[0]["items"].as_array().unwrap().len(), 4, "{}", stdout(&o));
    assert!(stderr(&o).contains("429 rate_limited") && stderr(&o).contains("trying again in 1 s"), "{}", stderr(&o));
    let o = txpipe(&["files", "--status", "nonsense", "--gateway", &base], Some(&key)).await;
    assert_exit(&o, 2, "files --status nonsense");
    assert!(stderr(&o).contains("400 bad_request: status must be one of"), "{}", stderr(&o));

    // no API key: one clear line on stderr, nothing on stdout, exit 2; for a file far larger
    // than socket buffers too (the gateway answers before the body and closes: the client asks
    // for 100 Continue first, so it reads that answer instead of a cut connection)
    let big = write(dir.path(), "big.csv", &valid_csv("big", 40_000));
    assert!(std::fs::metadata(&big).unwrap().len() > 2_000_000);
    let big_s = big.to_str().unwrap();
    let o = txpipe(&["upload", "--gateway", &base, big_s], None).await;
    assert_exit(&o, 2, "upload of a large file without a key");
    assert!(stderr(&o).contains("401 unauthorized"), "{}", stderr(&o));
    let o = txpipe(&["upload", "--wait", "--gateway", &base, valid_s], None).await;
    assert_exit(&o, 2, "upload without a key");
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("401 unauthorized") && err.contains("--api-key or TXPIPE_API_KEY"), "{err}");
    let o = txpipe(&["status", "--gateway", &base, &valid_id], None).await;
    assert_exit(&o, 2, "status without a key");
    assert!(stderr(&o).contains("401 unauthorized"), "{}", stderr(&o));

    // over the gateway's size limit: refused (413) on its declared length, exit 2
    let o = txpipe(&["upload", "--json", "--gateway", &base, big_s], Some(&key)).await;
    assert_exit(&o, 2, "upload over the limit");
    assert!(stderr(&o).contains("413 too_large"), "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["error"], "too_large", "the gateway's error body as it is");

    // an unknown file id: the gateway's 404, exit 2
    let o = txpipe(&["status", "--gateway", &base, "0190d1f4-0000-7000-8000-000000000000"], Some(&key)).await;
    assert_exit(&o, 2, "status of an unknown file");
    assert!(stderr(&o).contains("404 not_found"), "{}", stderr(&o));

    fleet.shutdown().await;
}

#[tokio::test]
async fn upload_sends_one_idempotency_key_per_file_and_says_when_the_gateway_is_away() {
    // a stand-in gateway that keeps the headers of each upload
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Option<String>, Option<String>)>::new()));
    let kept = seen.clone();
    let app = axum::Router::new().route(
        "/upload",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let first_busy = {
                    let mut kept = kept.lock().unwrap();
                    let first = get("idempotency-key").as_deref() == Some("busy")
                        && !kept.iter().any(|(k, _)| k.as_deref() == Some("busy"));
                    kept.push((get("idempotency-key"), get("content-length")));
                    first
                };
                if first_busy {
                    let busy = serde_json::json!({"error": "busy", "message": "too many uploads at once"});
                    let headers = [(axum::http::header::RETRY_AFTER, "1")];
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, headers, axum::Json(busy));
                }
                let answer = serde_json::json!({"file_id": "0190d1f4-0000-7000-8000-000000000001", "status": "uploaded",
                                                "size_bytes": body.len()});
                (axum::http::StatusCode::ACCEPTED, [(axum::http::header::RETRY_AFTER, "0")], axum::Json(answer))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.csv", &valid_csv("a", 3));
    let b = write(dir.path(), "b.csv", &valid_csv("b", 5));
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());

    let o = txpipe(&["upload", "--idempotency-key", "k7", "--gateway", &base, a_s, b_s], Some("txp_x")).await;
    assert_exit(&o, 0, "upload of two files with one idempotency key");
    let o = txpipe(&["upload", "--idempotency-key", "k8", "--gateway", &base, a_s], Some("txp_x")).await;
    assert_exit(&o, 0, "upload of one file with an idempotency key");
    let lens = [&a, &b, &b].map(|p| Some(std::fs::metadata(p).unwrap().len().to_string()));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (Some("k7-1".to_owned()), lens[0].clone()),
            (Some("k7-2".to_owned()), lens[1].clone()),
            (Some("k8".to_owned()), lens[0].clone()),
        ],
        "KEY-N for the Nth of several files, the key as given for one; the file's length declared"
    );
    seen.lock().unwrap().clear();

    // busy (503 with a short Retry-After): sent again, and said so on stderr
    let o = txpipe(&["upload", "--idempotency-key", "busy", "--gateway", &base, a_s], Some("txp_x")).await;
    assert_exit(&o, 0, "upload once the gateway is no longer busy");
    assert!(stderr(&o).contains("503 busy: too many uploads at once; trying again in 1 s"), "{}", stderr(&o));
    assert_eq!(seen.lock().unwrap().len(), 2, "the upload was sent twice");
    server.abort();
    let _ = server.await;

    // nobody listening any more: one line, exit 2; with --json the error in the gateway's shape
    let o = txpipe(&["upload", "--json", "--gateway", &base, b_s], Some("txp_x")).await;
    assert_exit(&o, 2, "upload to a gateway that is not there");
    assert!(stderr(&o).contains("cannot reach the gateway"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["error"], "unreachable");
    // a file that does not exist: exit 2
    let o = txpipe(&["upload", "--gateway", &base, "/nonexistent/x.csv"], Some("txp_x")).await;
    assert_exit(&o, 2, "upload of a missing file");
    assert!(stderr(&o).contains("cannot read /nonexistent/x.csv"), "{}", stderr(&o));
}

#[tokio::test]
async fn validate_checks_files_offline_with_the_validators_report() {
    let dir = tempfile::tempdir().unwrap();
    let valid = write(dir.path(), "valid.csv", &valid_csv("v", 200));
    let invalid = write(dir.path(), "invalid.csv", INVALID);
    let (valid_s, invalid_s) = (valid.to_str().unwrap(), invalid.to_str().unwrap());

    let o = txpipe(&["validate", valid_s], None).await;
    assert_exit(&o, 0, "validate of a valid file");
    assert_eq!(stdout(&o), format!("{valid_s}: valid, 200 rows\n"));

    let o = txpipe(&["validate", invalid_s], None).await;
    assert_exit(&o, 1, "validate of an invalid file");
    let text = stdout(&o);
    assert!(text.starts_with(&format!("{invalid_s}: invalid, 2 problems in 4 rows")), "{text}");
    assert!(text.contains("  row 2, column amount: 'ten' is not a decimal amount"), "{text}");
    assert!(text.contains("  row 4, column currency: "), "{text}");

    // --json: the validator's report, the same fields the status record carries
    let o = txpipe(&["validate", "--json", valid_s, invalid_s], None).await;
    assert_exit(&o, 1, "validate --json of both: the worst");
    let lines = json_lines(&o);
    assert_eq!(lines[0]["row_count"], 200);
    assert_eq!(lines[0]["error_count"], 0);
    assert_eq!(lines[1]["row_count"], 4);
    assert_eq!(lines[1]["error_count"], 2);
    assert_eq!(
        lines[1]["errors"][0],
        serde_json::json!({"row": 2, "column": "amount",
        "message": "'ten' is not a decimal amount (digits, an optional sign and decimal point, like -12.50)"})
    );
    let expected = txpipe_common::csv_schema::validate(|| std::fs::File::open(&invalid), 100).unwrap();
    assert_eq!(lines[1], serde_json::to_value(&expected).unwrap(), "exactly the validator's report");

    // a header without the required columns is a rejection too; a missing file a failure
    let headless = write(dir.path(), "headless.csv", "id,value\n1,2\n");
    let o = txpipe(&["validate", headless.to_str().unwrap()], None).await;
    assert_exit(&o, 1, "validate of a file without the required columns");
    assert!(stdout(&o).contains("  header: the header lacks required column(s)"), "{}", stdout(&o));
    let o = txpipe(&["validate", "/nonexistent/x.csv"], None).await;
    assert_exit(&o, 2, "validate of a missing file");
    assert!(stderr(&o).contains("cannot read /nonexistent/x.csv"), "{}", stderr(&o));

    // --max-errors caps the listing, never the count
    let mut many = String::from("transaction_id,amount,currency,timestamp,merchant,status\n");
    for i in 0..50 {
        many.push_str(&format!("m{i},x,USD,2024-01-15T10:30:00Z,Acme,completed\n"));
    }
    let many = write(dir.path(), "many.csv", &many);
    let o = txpipe(&["validate", "--max-errors", "5", many.to_str().unwrap()], None).await;
    assert_exit(&o, 1, "validate --max-errors");
    assert!(stdout(&o).contains("… and 45 more"), "{}", stdout(&o));
}

#[tokio::test]
async fn a_closed_stdout_ends_the_output_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("transaction_id,amount,currency,timestamp,merchant,status\n");
    for i in 0..5000 {
        text.push_str(&format!("m{i},x,USD,2024-01-15T10:30:00Z,Acme,completed\n"));
    }
    let file = write(dir.path(), "bad.csv", &text);
    let mut child = tokio::process::Command::new(procs::binary("txpipe"))
        .args(["validate", "--max-errors", "5000", file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // `txpipe validate … | head -0`: the reader is gone before the first line
    drop(child.stdout.take());
    let o = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await.unwrap().unwrap();
    assert_exit(&o, 1, "validate into a closed pipe: the verdict, not a panic");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

/// `txpipe bench e2e` as the benchmarks page runs it, small: its own `txpipe up` on a fresh
/// namespace (removed afterwards), every file through to `file.completed`, and in the same run
/// the broker's ceiling for the same messages, as a ratio.
#[tokio::test]
async fn bench_e2e_runs_the_pipeline_and_the_broker_ceiling_and_reports_both() {
    let o = txpipe(
        &["bench", "e2e", "--files", "6", "--rows", "20", "--concurrency", "3", "--warmup", "1", "--json"],
        None,
    )
    .await;
    assert_exit(&o, 0, "bench e2e");
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!((report["files"].as_u64(), report["completed"].as_u64()), (Some(6), Some(6)), "{report}");
    assert_eq!((report["failed"].as_u64(), report["missing"].as_u64()), (Some(0), Some(0)), "{report}");
    let (files_per_second, ceiling) =
        (report["files_per_second"].as_f64().unwrap(), report["broker_ceiling_files_per_second"].as_f64().unwrap());
    assert!(files_per_second > 0.0 && ceiling > 0.0, "{report}");
    // the ceiling is the median of its rounds
    let mut rounds: Vec<f64> =
        report["broker_ceiling_rounds"].as_array().unwrap().iter().map(|r| r.as_f64().unwrap()).collect();
    rounds.sort_by(f64::total_cmp);
    assert_eq!((rounds.len(), rounds[1]), (3, ceiling), "{report}");
    let ratio = report["ratio_to_broker"].as_f64().unwrap();
    assert!((ratio - files_per_second / ceiling).abs() < 1e-9, "{report}");
    assert!(report["completed_ms"]["p50"].as_f64().is_some(), "{report}");
    // CPU a file of the txpipe up it started and of itself (the broker's only when exactly one
    // runs on the host); /proc counts in 10 ms ticks, so a run this small may read 0
    for who in ["txpipe", "client"] {
        let ms = report["cpu_ms_per_file"][who].as_f64();
        assert!(ms.is_some_and(|ms| ms >= 0.0), "{who}'s CPU a file: {report}");
    }
}
