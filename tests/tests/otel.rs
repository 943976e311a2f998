//! OpenTelemetry export: the four binaries, each with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at
//! the harness's OTLP/HTTP receiver, export the spans of one upload as one trace that continues
//! the client's `traceparent` through the gateway, the validator, the transformer and the
//! notifier, with OpenTelemetry's messaging attributes and each service's `service.name`.
//!
//! Needs the binaries built (`cargo build --workspace --bins`; `scripts/test` does it).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::process::Child;
use txpipe_tests::otlp::{OtlpReceiver, ReceivedSpan};
use txpipe_tests::procs::{command, stop, wait_for_log};

const SERVICES: [&str; 4] = ["ingest-gateway", "validator", "transformer", "notifier"];

fn spawn(name: &str, ns: &str, data_dir: &std::path::Path, otlp: &str) -> Child {
    let mut cmd = command(name, ns, data_dir);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL");
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

#[tokio::test]
async fn one_trace_per_file_covers_all_four_services() {
    let receiver = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ns = txpipe_tests::fresh_namespace();

    let mut gateway = spawn("ingest-gateway", &ns, dir.path(), receiver.endpoint());
    let listening = wait_for_log(&mut gateway, "gateway listening").await;
    let base = format!("http://{}", listening["fields"]["addr"].as_str().unwrap());
    let mut workers = Vec::new();
    for name in ["validator", "transformer", "notifier"] {
        let mut child = spawn(name, &ns, dir.path(), receiver.endpoint());
        wait_for_log(&mut child, "consuming").await;
        workers.push(child);
    }
    let mut settings = txpipe_tests::test_settings(dir.path());
    settings.namespace = ns.clone();
    let storage = txpipe_common::storage::Storage::open(&settings).await.unwrap();
    let (_, key) =
        txpipe_common::auth::create_key(storage.keys.as_ref(), "otel", true, txpipe_tests::UNLIMITED).await.unwrap();
    let http = txpipe_tests::client_with_key(key.expose());

    // the client's own trace: the upload continues it
    let client_trace = format!("{:032x}", u128::from_be_bytes(*uuid::Uuid::new_v4().as_bytes()));
    let client_span = "00f067aa0ba902b7";
    let r = http
        .post(format!("{base}/upload"))
        .header("content-type", "text/csv")
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .body(txpipe_tests::valid_csv("otel", 20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let answered = r.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(answered.starts_with(&format!("00-{client_trace}-")), "the response continues the trace: {answered}");
    let file_id = r.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().to_owned();
    // without a traceparent, the gateway starts the trace and says which in its answer
    let r = http
        .post(format!("{base}/upload"))
        .header("content-type", "text/csv")
        .body(txpipe_tests::valid_csv("otel-fresh", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let fresh = r.headers()["traceparent"].to_str().unwrap().to_owned();
    let fresh_trace = fresh.split('-').nth(1).unwrap().to_owned();
    let fresh_id = r.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().to_owned();
    // a client that does not sample its trace: the file goes through, no span is exported
    let unsampled_trace = format!("{:032x}", u128::from_be_bytes(*uuid::Uuid::new_v4().as_bytes()));
    let r = http
        .post(format!("{base}/upload"))
        .header("content-type", "text/csv")
        .header("traceparent", format!("00-{unsampled_trace}-{client_span}-00"))
        .body(txpipe_tests::valid_csv("otel-unsampled", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers()["traceparent"].to_str().unwrap().ends_with("-00"), "the answer keeps the flag");
    let unsampled_id = r.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().to_owned();
    for id in [&file_id, &fresh_id, &unsampled_id] {
        txpipe_tests::wait_http_status(&http, &base, id, &["completed"], txpipe_tests::WAIT).await;
    }

    // SIGTERM: each service sends the spans it still holds before it exits
    for child in workers {
        assert!(stop(child).await.success(), "a worker exited non-zero after SIGTERM");
    }
    assert!(stop(gateway).await.success(), "the gateway exited non-zero after SIGTERM");

    let covered = |spans: &[ReceivedSpan]| {
        let services: BTreeSet<_> = spans.iter().map(|s| s.service.as_str()).collect();
        SERVICES.iter().all(|s| services.contains(s))
    };
    let spans = receiver.trace(&client_trace, Duration::from_secs(30), covered).await;
    let services: BTreeSet<_> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, SERVICES.into_iter().collect(), "one trace covers all four services: {spans:#?}");

    // every span this file made is in that one trace
    let of_file: Vec<_> =
        receiver.spans().into_iter().filter(|s| s.attributes.get("file_id") == Some(&file_id)).collect();
    assert!(!of_file.is_empty());
    assert!(of_file.iter().all(|s| s.trace_id == client_trace), "a span of the file in another trace: {of_file:#?}");

    // one tree: the gateway's span is the client's child, every other span has its parent here
    let by_id: HashMap<_, _> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let upload =
        spans.iter().find(|s| s.service == "ingest-gateway" && s.kind == 2).expect("the gateway's server span");
    assert_eq!(upload.parent_span_id, client_span);
    assert_eq!(answered, format!("00-{client_trace}-{}-01", upload.span_id), "the response names the gateway's span");
    for s in &spans {
        if s.span_id != upload.span_id {
            assert!(by_id.contains_key(s.parent_span_id.as_str()), "{s:#?} has no parent in the trace");
        }
    }

    // each worker consumed its queue, under a publish of the service before it
    for (stage, routing_key) in
        [("validator", "file.uploaded"), ("transformer", "file.validated"), ("notifier", "file.processed")]
    {
        let process = spans
            .iter()
            .find(|s| s.service == stage && s.kind == 5)
            .unwrap_or_else(|| panic!("no consumer span from the {stage}: {spans:#?}"));
        let a = &process.attributes;
        assert_eq!(a.get("messaging.system").map(String::as_str), Some("rabbitmq"));
        assert_eq!(a.get("messaging.operation").map(String::as_str), Some("process"));
        assert_eq!(a.get("messaging.destination.name"), Some(&format!("{ns}.{stage}")));
        assert_eq!(a.get("messaging.rabbitmq.destination.routing_key").map(String::as_str), Some(routing_key));
        assert!(a.get("messaging.message.id").is_some_and(|id| !id.is_empty()));
        assert_eq!(a.get("file_id"), Some(&file_id));
        let publish = by_id[process.parent_span_id.as_str()];
        assert_eq!(publish.kind, 4, "the {stage}'s parent is a producer span: {publish:#?}");
        assert_eq!(publish.attributes.get("messaging.operation").map(String::as_str), Some("publish"));
        assert_eq!(
            publish.attributes.get("messaging.rabbitmq.destination.routing_key").map(String::as_str),
            Some(routing_key)
        );
    }

    // the trace the gateway started: its span is the root, the whole pipeline under it
    let spans = receiver.trace(&fresh_trace, Duration::from_secs(30), covered).await;
    let services: BTreeSet<_> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, SERVICES.into_iter().collect(), "the gateway's trace covers all four services: {spans:#?}");
    let root = spans.iter().find(|s| s.service == "ingest-gateway" && s.kind == 2).expect("the gateway's server span");
    assert_eq!(root.parent_span_id, "", "a trace started at the gateway has its span as root");
    assert_eq!(fresh, format!("00-{fresh_trace}-{}-01", root.span_id));
    assert!(spans.iter().any(|s| s.attributes.get("file_id") == Some(&fresh_id)));

    // the processes have exited, their last spans sent: none of the unsampled trace came
    assert!(receiver.spans().iter().all(|s| s.trace_id != unsampled_trace), "an unsampled trace was exported");
    assert!(!receiver.spans().iter().any(|s| s.attributes.get("file_id") == Some(&unsampled_id)));

    let broker = txpipe_common::amqp::Broker::connect(&settings).await.unwrap();
    broker.teardown().await.unwrap();
}
