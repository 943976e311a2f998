//! API keys, usage plans and tenants, over real HTTP against the real broker: every endpoint
//! but the probes needs a key; a file is its uploader's (404 to other keys, admin keys see
//! all) and its notifications and dead letters name it; one daily quota is shared by two
//! gateways on one storage, a refused upload costs none of it; the rate limit answers 429 with
//! its headers; `txpipe keys`, `txpipe upload --api-key` and the key `txpipe up` keeps.

use std::time::Duration;
use txpipe_common::auth::KeyLimits;
use txpipe_common::messages::StageMessage;
use txpipe_common::stage::RoutingKey;
use txpipe_common::status::{FileStatus, StatusRecord};
use txpipe_common::FileId;
use txpipe_tests::{valid_csv, TestFleet, UNLIMITED};

fn limits(daily_quota: u64, rate_per_second: f64, burst: u32) -> KeyLimits {
    KeyLimits { daily_quota, rate_per_second, burst }
}

fn header(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} is a number"))
}

#[tokio::test]
async fn every_endpoint_but_the_probes_needs_a_valid_key() {
    let fleet = TestFleet::spawn().await;
    let id = fleet.upload(valid_csv("auth", 2)).await.file_id;
    let paths = [format!("/files/{id}"), format!("/files/{id}/transactions"), "/metrics".into()];
    for key in [None, Some("txp_0000"), Some("")] {
        for path in &paths {
            let (code, body) = fleet.get_as(key, path).await;
            assert_eq!(code, 401, "{path} with {key:?}: {body}");
            assert_eq!(body["error"], "unauthorized", "{body}");
            assert!(body["message"].as_str().unwrap().contains("API key"), "{body}");
        }
        let req = fleet.request_as(key, reqwest::Method::POST, "/upload").header("content-type", "text/csv");
        let r = req.body(valid_csv("no", 1)).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(fleet.object_count().await, 1, "an unauthorised upload stores nothing");
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(fleet.get_as(None, probe).await.0, 200, "{probe} needs no key");
    }
    // Authorization: Bearer works as well as x-api-key
    let r = fleet.request_as(None, reqwest::Method::GET, &paths[0]).bearer_auth(&fleet.api_key).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // a revoked key is refused at once
    let key = fleet.new_key("short-lived", false, UNLIMITED).await;
    let mine = fleet.upload_as(&key, valid_csv("sl", 1)).await;
    assert_eq!(mine.status(), 202);
    fleet.deps.storage.keys.revoke("short-lived", chrono::Utc::now()).await.unwrap();
    let (code, body) = fleet.get_as(Some(&key), "/metrics").await;
    assert_eq!((code, body["error"].as_str()), (401, Some("unauthorized")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("revoked"), "{body}");
    assert_eq!(fleet.upload_as(&key, valid_csv("sl2", 1)).await.status(), 401);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_file_is_its_uploaders_and_only_admin_keys_see_every_tenant() {
    let fleet = TestFleet::spawn().await;
    let mut tap = fleet.tap_notifications().await;
    let alice = fleet.new_key("alice", false, UNLIMITED).await;
    let bob = fleet.new_key("bob", false, UNLIMITED).await;
    let id_of = |v: serde_json::Value| v["file_id"].as_str().unwrap().parse::<FileId>().unwrap();
    let a = id_of(fleet.upload_as(&alice, valid_csv("alice", 3)).await.json().await.unwrap());
    let b = id_of(fleet.upload_as(&bob, valid_csv("bob", 2)).await.json().await.unwrap());
    // the admin key (the fleet's) sees both, with their owners
    let done_a = fleet.wait_for_status(a, &[FileStatus::Completed]).await;
    let done_b = fleet.wait_for_status(b, &[FileStatus::Completed]).await;
    assert_eq!(done_a.uploaded_by.as_deref(), Some("alice"));
    assert_eq!(done_b.uploaded_by.as_deref(), Some("bob"));

    let (unknown_code, unknown_body) = fleet.get_as(Some(&bob), &format!("/files/{}", FileId::new())).await;
    for (key, own, other) in [(&alice, a, b), (&bob, b, a)] {
        let (code, body) = fleet.get_as(Some(key), &format!("/files/{own}")).await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = fleet.get_as(Some(key), &format!("/files/{own}/transactions")).await;
        assert_eq!((code, body["items"].as_array().map(Vec::len).unwrap_or(0) > 0), (200, true), "{body}");
        for path in [format!("/files/{other}"), format!("/files/{other}/transactions")] {
            let (code, body) = fleet.get_as(Some(key), &path).await;
            assert_eq!(code, 404, "another tenant's file is not found: {body}");
            assert_eq!(body["error"], unknown_body["error"], "exactly as for a file that does not exist");
        }
    }
    assert_eq!(unknown_code, 404);

    // the notifications name the tenant
    let notes = tap.drain(Duration::from_millis(500)).await;
    for (id, owner) in [(a, "alice"), (b, "bob")] {
        let n = notes.iter().find(|n| n.body.file_id == id).expect("a notification for each file");
        assert_eq!(n.body.uploaded_by.as_deref(), Some(owner));
    }

    // so do dead letters (the stage message's body carries the owner) and file.failed
    let ghost = FileId::new();
    let mut rec = StatusRecord::uploaded(ghost, fleet.names.object_key(&ghost), 10, chrono::Utc::now());
    rec.uploaded_by = Some("alice".into());
    fleet.deps.storage.statuses.create(&rec).await.unwrap();
    fleet.publish_raw("file.uploaded", &StageMessage::from_record(RoutingKey::FileUploaded, &rec).to_body()).await;
    let dead = fleet.dlq_take().await.expect("the file without an object is dead-lettered");
    let body: serde_json::Value = serde_json::from_slice(&dead.body).unwrap();
    assert_eq!(body["uploaded_by"], "alice", "{body}");
    let failed = tap.next(txpipe_tests::WAIT).await.expect("file.failed");
    assert_eq!((failed.routing_key.as_str(), failed.body.uploaded_by.as_deref()), ("file.failed", Some("alice")));
    fleet.shutdown().await;
}

#[tokio::test]
async fn one_daily_quota_is_shared_by_two_gateways_and_a_refused_upload_costs_none() {
    let fleet = TestFleet::spawn().await;
    // a second gateway replica with its own storage handle on the same tables
    let deps = txpipe_common::Deps::with_storage((*fleet.deps.settings).clone(), fleet.second_storage().await)
        .await
        .expect("connect the second gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(txpipe_ingest_gateway::run(listener, deps.clone(), stop.clone().cancelled_owned()));

    let key = fleet.new_key("quota3", false, limits(3, 1000.0, 1000)).await;
    let client = txpipe_tests::client_with_key(&key);
    let post = |base: &str, body: reqwest::Body| {
        client.post(format!("{base}/upload")).header("content-type", "text/csv").body(body).send()
    };
    // a refused upload (an empty body, found empty only once it is read) is given back
    let empty = reqwest::Body::wrap_stream(futures::stream::iter(Vec::<Result<bytes::Bytes, std::io::Error>>::new()));
    let r = post(&second, empty).await.unwrap();
    assert_eq!(r.status(), 400);
    let mut remaining = Vec::new();
    for (i, base) in [&fleet.base_url, &second, &fleet.base_url].into_iter().enumerate() {
        let r = post(base, valid_csv(&format!("q{i}"), 1).into()).await.unwrap();
        assert_eq!(r.status(), 202, "upload {i}");
        assert_eq!(header(&r, "x-quota-limit"), 3);
        remaining.push(header(&r, "x-quota-remaining"));
    }
    assert_eq!(remaining, [2, 1, 0], "one count across both gateways, the refused upload not in it");
    for base in [&second, &fleet.base_url] {
        let r = post(base, valid_csv("over", 1).into()).await.unwrap();
        assert_eq!(r.status(), 429);
        let reset = header(&r, "x-quota-reset");
        assert!((1..=86_400).contains(&reset), "resets at the next UTC midnight: {reset}");
        assert_eq!(header(&r, "retry-after"), reset);
        assert_eq!((header(&r, "x-quota-limit"), header(&r, "x-quota-remaining")), (3, 0));
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "quota_exceeded", "{body}");
    }
    assert_eq!(fleet.object_count().await, 3, "an upload over quota stores nothing");
    // another key has its own quota
    let other = fleet.new_key("other", false, limits(3, 1000.0, 1000)).await;
    assert_eq!(fleet.upload_as(&other, valid_csv("other", 1)).await.status(), 202);
    stop.cancel();
    server.await.unwrap().unwrap();
    fleet.shutdown().await;
}

#[tokio::test]
async fn over_the_rate_a_key_gets_429_with_its_headers_and_keeps_its_quota() {
    let fleet = TestFleet::spawn().await;
    let key = fleet.new_key("slow", false, limits(10, 1.0, 2)).await;
    let path = format!("/files/{}", FileId::new());
    let get = || fleet.request_as(Some(&key), reqwest::Method::GET, &path).send();
    for left in [1, 0] {
        let r = get().await.unwrap();
        assert_eq!(r.status(), 404, "let through");
        assert_eq!((header(&r, "x-ratelimit-limit"), header(&r, "x-ratelimit-remaining")), (2, left));
    }
    let r = get().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!((header(&r, "x-ratelimit-limit"), header(&r, "x-ratelimit-remaining")), (2, 0));
    assert!(header(&r, "retry-after") >= 1);
    assert!(header(&r, "x-ratelimit-reset") >= 1);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");

    // an upload refused for its rate is not counted against the quota
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let first = fleet.upload_as(&key, valid_csv("r1", 1)).await;
    assert_eq!((first.status().as_u16(), header(&first, "x-quota-remaining")), (202, 9));
    fleet.upload_as(&key, valid_csv("r2", 1)).await; // the burst's second token
    let refused = fleet.upload_as(&key, valid_csv("r3", 1)).await;
    assert_eq!(refused.status(), 429);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let next = fleet.upload_as(&key, valid_csv("r4", 1)).await;
    assert_eq!((next.status().as_u16(), header(&next, "x-quota-remaining")), (202, 7));
    fleet.shutdown().await;
}

#[tokio::test]
async fn with_auth_off_no_key_is_asked_and_files_have_no_owner() {
    let fleet = TestFleet::spawn_with(|s| s.auth = txpipe_common::config::AuthMode::None).await;
    let r = fleet.request_as(None, reqwest::Method::POST, "/upload").header("content-type", "text/csv");
    let r = r.body(valid_csv("open", 1)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let id: FileId = r.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().parse().unwrap();
    let (code, body) = fleet.get_as(None, &format!("/files/{id}")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.get("uploaded_by").is_none(), "{body}");
    assert_eq!(fleet.get_as(None, "/metrics").await.0, 200);
    fleet.shutdown().await;
}

fn txpipe_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("txpipe");
    assert!(bin.exists(), "build the binaries first (scripts/test does)");
    bin
}

/// Runs the built `txpipe` on the fleet's namespace and data directory.
fn txpipe(fleet: &TestFleet, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(txpipe_bin());
    cmd.args(args)
        .env("TXPIPE_NAMESPACE", fleet.names.namespace())
        .env("TXPIPE_DATA_DIR", fleet.dir.path())
        .env_remove("TXPIPE_API_KEY")
        // the harness's own variable, not a setting: these run on local storage
        .env_remove("TXPIPE_TEST_STORAGE")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

// the CLI runs synchronously while the fleet serves it: the fleet needs threads of its own
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txpipe_keys_creates_lists_and_revokes_and_the_client_commands_send_the_key() {
    let fleet = TestFleet::spawn_local().await;
    let (ok, out, err) =
        txpipe(&fleet, &["keys", "create", "ci", "--daily-quota", "5", "--rate", "2", "--burst", "3", "--json"], &[]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "one JSON object on one line: {out}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "ci");
    assert!(key.starts_with("txp_") && key.len() == 68, "{key}");
    assert_eq!((created["daily_quota"].as_u64(), created["burst"].as_u64()), (Some(5), Some(3)));
    let (ok, out, _) = txpipe(&fleet, &["keys", "create", "ops", "--admin"], &[]);
    assert!(ok && out.contains("txp_"), "{out}");
    let (ok, _, err) = txpipe(&fleet, &["keys", "create", "ci"], &[]);
    assert!(!ok && err.contains("exists already"), "names are never reused: {err}");

    for args in [&["keys", "list"][..], &["keys", "list", "--json"]] {
        let (ok, out, err) = txpipe(&fleet, args, &[]);
        assert!(ok, "{err}");
        assert!(out.contains("ci") && out.contains("ops") && out.contains("test-admin"), "{out}");
        assert!(!out.contains("txp_"), "never the secret: {out}");
        if args.contains(&"--json") {
            assert_eq!(out.trim_end().lines().count(), 1, "one JSON document on one line: {out}");
        }
    }

    // the client commands send the key, from --api-key or TXPIPE_API_KEY
    let file = fleet.dir.path().join("sample.csv");
    std::fs::write(&file, valid_csv("cli", 2)).unwrap();
    let file = file.to_str().unwrap();
    let base = fleet.base_url.as_str();
    let (ok, _, err) = txpipe(&fleet, &["upload", file, "--gateway", base], &[]);
    assert!(!ok && err.contains("401 unauthorized"), "{err}");
    let (ok, out, err) = txpipe(&fleet, &["upload", "--json", file, "--gateway", base], &[("TXPIPE_API_KEY", &key)]);
    assert!(ok, "{out} {err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["file_id"].as_str().unwrap().to_owned();
    let (ok, out, err) = txpipe(&fleet, &["status", "--json", &id, "--gateway", base, "--api-key", &key], &[]);
    assert!(ok, "{out} {err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["uploaded_by"], "ci", "{out}");

    let (ok, out, err) = txpipe(&fleet, &["keys", "revoke", "ci"], &[]);
    assert!(ok && out.contains("revoked"), "{out} {err}");
    assert_eq!(fleet.get_as(Some(&key), &format!("/files/{id}")).await.0, 401);
    let (ok, _, err) = txpipe(&fleet, &["keys", "revoke", "nobody"], &[]);
    assert!(!ok && err.contains("no API key named nobody"), "{err}");

    // `keys ensure` (compose's Prometheus key): made once, kept private, kept while valid
    let kept = fleet.dir.path().join("keys").join("prometheus");
    let ensure = ["keys", "ensure", "prometheus", "--file", kept.to_str().unwrap()];
    let (ok, _, err) = txpipe(&fleet, &ensure, &[]);
    assert!(ok, "{err}");
    let first = std::fs::read_to_string(&kept).unwrap();
    assert!(txpipe(&fleet, &ensure, &[]).0);
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), first, "a valid key is kept");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert_eq!(fleet.get_as(Some(first.trim()), "/metrics").await.0, 200);
    fleet.shutdown().await;
}

/// Starts `txpipe up` on port 0; returns the process, the gateway URL, the key it printed and
/// the file its log lines (stderr) go to.
async fn up(dir: &std::path::Path, ns: &str) -> (tokio::process::Child, String, String, std::path::PathBuf) {
    use tokio::io::AsyncBufReadExt;
    let log = dir.join(format!("up-{}.log", uuid::Uuid::new_v4().simple()));
    let mut child = tokio::process::Command::new(txpipe_bin())
        .arg("up")
        .env("TXPIPE_NAMESPACE", ns)
        .env("TXPIPE_DATA_DIR", dir)
        .env("TXPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env_remove("TXPIPE_API_KEY")
        // the harness's own variable, not a setting: these run on local storage
        .env_remove("TXPIPE_TEST_STORAGE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let curl = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("upload with: curl") {
                return line;
            }
        }
        panic!("txpipe up ended before printing its curl line");
    })
    .await
    .expect("txpipe up prints its curl line");
    let key =
        regex::Regex::new(r"x-api-key: (txp_[0-9a-f]{64})").unwrap().captures(&curl).expect("the key")[1].to_owned();
    let url = regex::Regex::new(r"(http://[0-9.:]+)/upload").unwrap().captures(&curl).expect("the URL")[1].to_owned();
    (child, url, key, log)
}

/// Stops `txpipe up` as a supervisor would: it exits 0 and logs no error on the way (an
/// operator alerting on ERROR lines sees none at a deploy).
async fn stop(mut child: tokio::process::Child, log: &std::path::Path) {
    let pid = child.id().expect("running").to_string();
    tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(40), child.wait()).await.expect("stops").unwrap();
    assert!(status.success());
    let lines = std::fs::read_to_string(log).unwrap();
    let errors: Vec<&str> = lines.lines().filter(|l| l.contains(r#""level":"ERROR""#)).collect();
    assert!(errors.is_empty(), "a clean stop logged errors: {errors:#?}");
    assert!(lines.contains(r#""message":"stopped""#), "{lines}");
}

#[tokio::test]
async fn txpipe_up_makes_a_local_key_once_keeps_it_private_and_prints_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let ns = txpipe_tests::fresh_namespace();
    let (first, url, key, first_log) = up(dir.path(), &ns).await;
    let client = txpipe_tests::client_with_key(&key);
    let r = client.post(format!("{url}/upload")).header("content-type", "text/csv").body(valid_csv("up", 1));
    assert_eq!(r.send().await.unwrap().status(), 202, "the printed curl line works");
    let kept = dir.path().join(format!("{ns}-api-key"));
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    }
    stop(first, &first_log).await;
    let (second, _, again, second_log) = up(dir.path(), &ns).await;
    assert_eq!(again, key, "a later start prints the same key");
    stop(second, &second_log).await;

    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.namespace = ns;
    let storage = txpipe_common::storage::Storage::open(&settings).await.unwrap();
    let keys = storage.keys.list().await.unwrap();
    assert_eq!(keys.iter().map(|k| (k.name.as_str(), k.admin)).collect::<Vec<_>>(), [("local", true)]);
    let broker = txpipe_common::amqp::Broker::connect(&settings).await.unwrap();
    broker.teardown().await.unwrap();
}
