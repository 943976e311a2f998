//! The distributed engine: txpipe against a three-node RabbitMQ cluster that loses nodes.
//!
//! The test starts three RabbitMQ nodes of its own on this machine (`scripts/rabbitmq-cluster`:
//! their own node names, ports and data directories; the shared broker on 5672 is never
//! touched), runs a fleet given all three addresses, checks that txpipe's quorum queues are
//! replicated on all three nodes, and while a batch of files goes through kills with SIGKILL
//! first a follower, then the leader of the busiest queue (each restarted a few seconds later).
//! The ledger: every file completed, nothing lost, no row written twice, one notification id
//! per file, the DLQ empty.

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;
use txpipe_common::stage::Stage;
use txpipe_common::status::FileStatus;
use txpipe_common::{FileId, Settings};
use txpipe_tests::{valid_csv, TestFleet};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/rabbitmq-cluster");
const FILES: usize = 40;
const ROWS: usize = 300;

/// Three RabbitMQ nodes of this test's own, stopped and removed when dropped.
struct Cluster {
    dir: String,
    urls: String,
}

fn script(args: &[&str]) -> String {
    let out = Command::new(SCRIPT).args(args).output().expect("scripts/rabbitmq-cluster runs");
    assert!(out.status.success(), "rabbitmq-cluster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A base port with the three AMQP ports and their distribution ports (+10000) free.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base = 21000 + (uuid::Uuid::new_v4().as_u128() % 8000) as u16;
        let free = (0..3).all(|i| {
            TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", base + 10000 + i)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free ports for the cluster");
}

impl Cluster {
    async fn start() -> Self {
        let dir = format!("/tmp/txpipe-cluster-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let base = free_base_port().to_string();
        let d = dir.clone();
        let urls = tokio::task::spawn_blocking(move || script(&["start", &d, &base])).await.unwrap();
        Self { dir, urls }
    }

    fn node(&self, n: usize) -> String {
        format!("txpipe-c{n}-{}@localhost", self.dir.rsplit('/').next().unwrap())
    }

    /// Each queue of the cluster with its leader node and members, as node `ask` sees them.
    fn queues(&self, ask: usize) -> BTreeMap<String, (String, Vec<String>)> {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.node(ask), "-q", "list_queues", "name", "leader", "members", "--formatter", "json"])
            .output()
            .unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let members = r["members"].as_array()?.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect();
                Some((r["name"].as_str()?.to_owned(), (r["leader"].as_str().unwrap_or("").to_owned(), members)))
            })
            .collect()
    }

    fn number_of(&self, node: &str) -> usize {
        (1..=3).find(|n| self.node(*n) == node).unwrap_or_else(|| panic!("{node} is not one of ours"))
    }

    /// Kills node `n` with SIGKILL, waits, and starts it again (it rejoins the cluster).
    async fn kill_and_restart(&self, n: usize, down_for: Duration) {
        let dir = self.dir.clone();
        let (d, k) = (dir.clone(), n.to_string());
        tokio::task::spawn_blocking(move || script(&["kill", &d, &k])).await.unwrap();
        tokio::time::sleep(down_for).await;
        let k = n.to_string();
        tokio::task::spawn_blocking(move || script(&["restart", &dir, &k])).await.unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT).args(["stop", &self.dir]).output();
    }
}

/// Waits for a file to complete. Longer than the harness's usual wait: a message that was out
/// with a consumer on a killed node goes back to its queue only once the queue's leader has
/// seen that node go (RabbitMQ's own failure detection, up to about a minute).
async fn completed(fleet: &TestFleet, id: FileId) -> txpipe_common::status::StatusRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let r = fleet.status(id).await;
        if r.status == FileStatus::Completed {
            return r;
        }
        assert!(!r.status.is_final(), "file {id} ended {}: {:?}", r.status, r.reason);
        assert!(tokio::time::Instant::now() < deadline, "file {id} never completed: {r:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_node_cluster_loses_a_follower_then_a_leader_and_nothing_is_lost() {
    let cluster = Cluster::start().await;
    let urls = cluster.urls.clone();
    let fleet = TestFleet::spawn_with(|s| {
        s.amqp_url = urls;
        s.storage = txpipe_common::config::StorageKind::Local;
        s.reconnect_timeout_ms = 120_000;
        // the default retry schedule (2 s, then 4 s, ...), not the tests' fast one: a publish
        // that fails while a queue elects its new leader must outlast the election, as it does
        // in production
        s.retry_initial_delay_ms = Settings::default().retry_initial_delay_ms;
        s.retry_attempts = 5;
    })
    .await;
    let broker = &fleet.deps.broker;
    let names = fleet.names.clone();

    // a durable, replicated queue of our own on the notifications exchange, read at the end
    let tap = format!("{}.test-tap", names.namespace());
    let ch = broker.channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(tap.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .unwrap();
    ch.queue_bind(
        tap.as_str().into(),
        names.notifications_exchange().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // txpipe's stage queues are quorum queues replicated on all three nodes
    let queues = cluster.queues(1);
    for stage in Stage::ALL {
        let (_, members) = queues.get(&names.queue(stage)).unwrap_or_else(|| panic!("{stage} queue in the cluster"));
        assert_eq!(members.len(), 3, "{stage}'s queue is replicated on every node: {members:?}");
    }

    // the batch, uploaded by a client that retries what the gateway refuses (503) for a while
    let uploads = {
        let (http, base) = (fleet.http.clone(), fleet.base_url.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut refused = 0;
            for i in 0..FILES {
                let body = valid_csv(&format!("c{i:03}"), ROWS);
                let id = loop {
                    let r = http
                        .post(format!("{base}/upload"))
                        .header("content-type", "text/csv")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    if r.status() == 202 {
                        break r.json::<serde_json::Value>().await.unwrap()["file_id"].as_str().unwrap().to_owned();
                    }
                    assert_eq!(r.status(), 503, "only a retryable refusal is expected");
                    refused += 1;
                    assert!(refused < 600, "the gateway kept refusing uploads");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                };
                ids.push(id.parse::<FileId>().unwrap());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (ids, refused)
        })
    };

    // mid-batch: a follower of the busiest queue (the transformer's: it holds each file the
    // longest), then its leader
    let busiest = names.queue(Stage::Transformer);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (leader, members) = cluster.queues(1)[&busiest].clone();
    let follower = members.iter().find(|m| **m != leader).unwrap().clone();
    cluster.kill_and_restart(cluster.number_of(&follower), Duration::from_secs(2)).await;
    let ask = cluster.number_of(&follower);
    let (leader, _) = cluster.queues(ask)[&busiest].clone();
    cluster.kill_and_restart(cluster.number_of(&leader), Duration::from_secs(2)).await;

    let (ids, refused) = uploads.await.unwrap();
    // the leader's node was the one the fleet was connected to (it declared the queues there):
    // the fleet failed over to another node
    let connections = match broker.link() {
        txpipe_common::amqp::Link::Up(n) => n,
        other => panic!("the fleet is not connected: {other:?}"),
    };
    assert_eq!(ids.len(), FILES);
    let mut rows = 0;
    for id in &ids {
        let r = completed(&fleet, *id).await;
        assert_eq!(r.records_processed, Some(ROWS as u64));
        let stored = fleet.transactions(*id, 1000).await;
        let unique: BTreeSet<_> = stored.iter().map(|t| t.transaction_id.clone()).collect();
        assert_eq!((stored.len(), unique.len()), (ROWS, ROWS), "every row of {id} once");
        rows += stored.len();
    }

    // notifications: one id per file (copies allowed, they share it)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ch = broker.channel().await.unwrap();
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(m) = ch.basic_get(tap.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        let id = m.delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
        *by_id.entry(id).or_default() += 1;
    }
    let completed: BTreeSet<String> = ids.iter().map(|id| format!("{id}:file.completed")).collect();
    assert_eq!(by_id.keys().cloned().collect::<BTreeSet<_>>(), completed, "one completion notice id per file");
    let dlq = ch
        .queue_declare(
            names.dead_letter_queue().as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(dlq, 0, "nothing dead-lettered");
    eprintln!(
        "cluster (3 nodes; SIGKILL a follower, then the leader of {busiest}): pushed {FILES}, completed {}, lost 0, \
         rows {rows}, duplicate rows 0, notification ids {} ({} copies), uploads refused and retried {refused}, broker connections {connections}, DLQ {dlq}",
        ids.len(),
        by_id.len(),
        by_id.values().sum::<usize>()
    );
    fleet.shutdown().await;
    drop(cluster);
}
