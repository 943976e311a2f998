//! The DLQ tooling (`txpipe dlq list|show|replay|purge`, `txpipe retry`) against real dead letters.

use std::time::Duration;
use txpipe_cli::dlq::{self, Filter};
use txpipe_common::messages::StageMessage;
use txpipe_common::stage::RoutingKey;
use txpipe_common::status::{FileStatus, StatusRecord};
use txpipe_common::FileId;
use txpipe_tests::{ghost, valid_csv, TestFleet};

/// Records a file whose object is not (yet) stored, and announces it: the validator fails it.
async fn file_without_object(fleet: &TestFleet) -> (FileId, String) {
    let id = FileId::new();
    let key = fleet.names.object_key(&id);
    let rec = StatusRecord::uploaded(id, key.clone(), 10, chrono::Utc::now());
    fleet.deps.storage.statuses.create(&rec).await.unwrap();
    fleet.publish_raw("file.uploaded", &StageMessage::uploaded(id, key.clone()).to_body()).await;
    (id, key)
}

async fn store(fleet: &TestFleet, key: &str, body: String) {
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body))]);
    fleet.deps.storage.objects.put(key, Box::pin(stream)).await.unwrap();
}

async fn wait_dlq(fleet: &TestFleet, n: u32) {
    let deadline = tokio::time::Instant::now() + txpipe_tests::WAIT;
    while fleet.dlq_count().await != n {
        assert!(tokio::time::Instant::now() < deadline, "the DLQ never held {n}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn txpipe(fleet: &TestFleet, args: &[&str]) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("txpipe");
    assert!(bin.exists(), "build the binaries first (scripts/test does)");
    std::process::Command::new(bin)
        .args(args)
        .env("TXPIPE_NAMESPACE", fleet.names.namespace())
        .env("TXPIPE_DATA_DIR", fleet.dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn dead_letters_can_be_listed_replayed_and_purged() {
    let fleet = TestFleet::spawn_local().await;
    fleet.publish_raw("file.uploaded", b"not json").await;
    let (a, a_key) = file_without_object(&fleet).await;
    let ghost = ghost(RoutingKey::FileValidated);
    fleet.publish_raw("file.validated", &ghost.to_body()).await;
    wait_dlq(&fleet, 3).await;
    let broker = &fleet.deps.broker;

    let all = dlq::list(broker, &Filter::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(fleet.dlq_count().await, 3, "listing leaves the DLQ as it was");
    let by_file = |f: FileId| all.iter().find(|d| d.file_id == Some(f)).unwrap();
    assert_eq!(by_file(a).stage.as_deref(), Some("validator"));
    assert_eq!(by_file(a).class, "permanent");
    assert!(by_file(a).reason.contains("not found"), "{}", by_file(a).reason);
    assert_eq!(by_file(a).routing_key, "file.uploaded");
    assert_eq!(by_file(a).exchange, fleet.names.pipeline_exchange());
    assert_eq!(by_file(ghost.file_id()).stage.as_deref(), Some("transformer"));
    let malformed: Vec<_> = all.iter().filter(|d| d.class == "malformed").collect();
    assert_eq!((malformed.len(), malformed[0].file_id), (1, None));
    assert!(all.iter().all(|d| d.dead_lettered_at.is_some()));

    let only = Filter { stage: Some("transformer".into()), ..Default::default() };
    assert_eq!(dlq::list(broker, &only).await.unwrap().len(), 1);

    let for_a = Filter { file_id: Some(a), ..Default::default() };
    assert_eq!(dlq::replay(broker, &for_a, true).await.unwrap().len(), 1);
    assert_eq!(fleet.dlq_count().await, 3, "a dry run changes nothing");

    // the fault is fixed; the replayed message is processed as usual
    store(&fleet, &a_key, valid_csv("a", 5)).await;
    assert_eq!(dlq::replay(broker, &for_a, false).await.unwrap().len(), 1);
    assert_eq!(fleet.dlq_count().await, 2);
    let done = fleet.wait_for_status(a, &[FileStatus::Completed]).await;
    assert_eq!(done.records_processed, Some(5));

    // the CLI: a table, a refusal to purge without asking, then a purge
    let out = txpipe(&fleet, &["dlq", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        table.contains("2 dead letter(s)") && table.contains("malformed") && table.contains("transformer"),
        "{table}"
    );
    let out = txpipe(&fleet, &["dlq", "list", "--stage", "transformer"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("1 dead letter(s)") && table.contains("match the filter"), "{table}");
    let out = txpipe(&fleet, &["dlq", "list", "--stage", "nosuch"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a stage"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = txpipe(&fleet, &["dlq", "show", "1"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"headers\""));
    let out = txpipe(&fleet, &["dlq", "purge"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without --yes"));
    assert_eq!(fleet.dlq_count().await, 2);
    let out = txpipe(&fleet, &["dlq", "purge", "--yes"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 2"));
    assert_eq!(fleet.dlq_count().await, 0);

    // deleting the topology says what it takes with it
    fleet.publish_raw("file.uploaded", b"not json").await;
    for _ in 0..100 {
        if fleet.dlq_count().await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let out = txpipe(&fleet, &["topology", "down"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("deleted 1 dead letter(s)") && said.contains("txpipe retry"), "{said}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_failed_file_can_be_retried_from_its_stored_object() {
    let fleet = TestFleet::spawn_local().await;
    let (b, b_key) = file_without_object(&fleet).await;
    fleet.wait_for_status(b, &[FileStatus::ValidationFailed]).await;
    store(&fleet, &b_key, valid_csv("b", 4)).await;
    assert_eq!(dlq::retry(&fleet.deps, b).await.unwrap(), RoutingKey::FileUploaded);
    let done = fleet.wait_for_status(b, &[FileStatus::Completed]).await;
    assert_eq!(done.records_processed, Some(4));

    // nothing to retry: a completed file, a file rejected for its contents, an unknown file
    let err = dlq::retry(&fleet.deps, b).await.unwrap_err().to_string();
    assert!(err.contains("only a failed file"), "{err}");
    let bad =
        fleet.upload("transaction_id,amount,currency,timestamp,merchant,status\nx,1,USD,nope,m,completed\n").await;
    fleet.wait_for_status(bad.file_id, &[FileStatus::ValidationFailed]).await;
    let err = dlq::retry(&fleet.deps, bad.file_id).await.unwrap_err().to_string();
    assert!(err.contains("corrected file"), "{err}");
    assert!(dlq::retry(&fleet.deps, FileId::new()).await.unwrap_err().to_string().contains("no file"));
    fleet.shutdown().await;
}
