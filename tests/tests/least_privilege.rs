//! Least privilege, proven on the live broker: the users and permissions of
//! `compose/rabbitmq/definitions.json` are loaded into a vhost of their own on the real
//! RabbitMQ (users renamed with a random suffix, so nothing clashes with anything else on the
//! broker), the four services run end to end as those users with the passwords compose gives
//! them, and each user is refused what its service must never do.

use serde_json::Value as Json;
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use txpipe_common::messages::{Outgoing, StageMessage};
use txpipe_common::stage::Stage;
use txpipe_common::status::FileStatus;
use txpipe_common::storage::Storage;
use txpipe_common::{Deps, FileId, Settings};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    rabbitmqctl_with_input(args, "")
}

/// Runs rabbitmqctl with `input` on its standard input (the broker runs as another user, so
/// definitions travel through the CLI rather than a file the broker would have to read).
fn rabbitmqctl_with_input(args: &[&str], input: &str) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new("rabbitmqctl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    child.stdin.take().expect("piped").write_all(input.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| format!("rabbitmqctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("rabbitmqctl {args:?} failed: {text}"))
    }
}

/// The vhost and users this test loaded; removed again however the test ends.
struct Loaded {
    vhost: String,
    users: Vec<String>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.vhost]);
        for u in &self.users {
            let _ = rabbitmqctl(&["delete_user", u]);
        }
    }
}

/// Loads definitions.json's users into a fresh vhost, each user's name suffixed; their
/// password hashes, tags and permission patterns are used as they are.
fn load_definitions(suffix: &str) -> Loaded {
    let text = std::fs::read_to_string(format!("{ROOT}/compose/rabbitmq/definitions.json")).unwrap();
    let defs: Json = serde_json::from_str(&text).unwrap();
    let vhost = format!("txpipe-lp-{suffix}");
    // every entry of a list, its `field` (a user name) suffixed, and `also` applied
    let renamed = |list: &str, field: &str, also: &dyn Fn(&mut Json)| -> Vec<Json> {
        let mut out: Vec<Json> = defs[list].as_array().unwrap().clone();
        for e in &mut out {
            e[field] = format!("{}-{suffix}", e[field].as_str().unwrap()).into();
            also(e);
        }
        out
    };
    let users = renamed("users", "name", &|_| {});
    let permissions = renamed("permissions", "user", &|p| p["vhost"] = vhost.clone().into());
    let loaded =
        Loaded { vhost: vhost.clone(), users: users.iter().map(|u| u["name"].as_str().unwrap().to_owned()).collect() };
    let doc = serde_json::json!({"vhosts": [{"name": vhost}], "users": users, "permissions": permissions});
    rabbitmqctl_with_input(&["import_definitions", "--format", "json"], &doc.to_string()).expect("definitions load");
    loaded
}

/// The password compose gives `user` in its TXPIPE_AMQP_URL.
fn compose_password(user: &str) -> String {
    let text = std::fs::read_to_string(format!("{ROOT}/compose/compose.yaml")).unwrap();
    let prefix = format!("amqp://{user}:");
    let start = text.find(&prefix).unwrap_or_else(|| panic!("compose gives {user} a broker URL")) + prefix.len();
    text[start..].split('@').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_works_as_its_own_user_and_is_refused_what_it_must_not_do() {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let loaded = load_definitions(&suffix);
    let dir = tempfile::tempdir().unwrap();
    // the definitions are written for namespace txpipe; the vhost keeps it apart
    let base = Settings { namespace: "txpipe".into(), data_dir: dir.path().to_owned(), ..Settings::default() };
    let storage = Storage::open(&base).await.unwrap();
    let deps_as = |service: &'static str| {
        let user = format!("txpipe-{service}");
        let url = format!("amqp://{user}-{suffix}:{}@127.0.0.1:5672/{}", compose_password(&user), loaded.vhost);
        let settings = Settings { amqp_url: url, ..base.clone() };
        let storage = storage.clone();
        async move { Deps::with_storage(settings, storage).await.unwrap_or_else(|e| panic!("{service} connects: {e}")) }
    };
    let gateway = deps_as("gateway").await;
    let workers = [deps_as("validator").await, deps_as("transformer").await, deps_as("notifier").await];

    // the gateway may not create the validator's queue itself (that needs the right to
    // consume it): before `txpipe provision` it says so
    let err = gateway.broker.declare_for(txpipe_common::stage::Service::Gateway).await.unwrap_err().to_string();
    assert!(err.contains("txpipe.validator") && err.contains("txpipe provision"), "{err}");
    // as compose does: provision, as the admin user, declares the whole topology first
    let admin = deps_as("admin").await;
    admin.broker.declare_all().await.expect("the admin declares the topology");
    admin.broker.close().await;

    // the whole pipeline, each service declaring what it uses as its own user
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    let (d, s) = (gateway.clone(), stop.clone());
    tasks.spawn(async move {
        txpipe_ingest_gateway::run(listener, d, s.cancelled_owned()).await.map_err(|e| e.to_string())
    });
    for (i, deps) in workers.iter().enumerate() {
        let handler = txpipe_cli::fleet::handlers(deps)[i].clone();
        let (d, s) = (deps.clone(), stop.clone());
        tasks.spawn(async move {
            txpipe_common::worker::run(&d, handler, s.cancelled_owned()).await.map_err(|e| e.to_string())
        });
    }
    let key = txpipe_tests::new_key(&gateway, "least-privilege", true, txpipe_tests::UNLIMITED).await;
    let http = txpipe_tests::client_with_key(&key);
    let mut accepted = None;
    for _ in 0..50 {
        // the gateway declares its topology as it starts
        let r = http
            .post(format!("{url}/upload"))
            .header("content-type", "text/csv")
            .body(txpipe_tests::valid_csv("lp", 5))
            .send()
            .await;
        if let Some(r) = r.ok().filter(|r| r.status() == 202) {
            accepted = Some(r.json::<Json>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(accepted) = accepted else {
        stop.cancel();
        let mut why = Vec::new();
        while let Some(done) = tasks.join_next().await {
            why.push(format!("{:?}", done.unwrap()));
        }
        panic!("the gateway never accepted an upload as txpipe-gateway: {why:?}");
    };
    let file_id: FileId = accepted["file_id"].as_str().unwrap().parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = storage.statuses.get(file_id).await.unwrap().unwrap();
        if r.status == FileStatus::Completed {
            assert_eq!(r.records_processed, Some(5));
            break;
        }
        assert!(!r.status.is_final(), "the file ended {}: {:?}", r.status, r.reason);
        assert!(tokio::time::Instant::now() < deadline, "the file never completed: {}", r.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // an upload that waits for its verdict: the gateway hears it on a queue of its own (made
    // while uploads wait, kept a while after), which its user may declare, bind to the
    // pipeline and notifications exchanges, and consume
    let r = http
        .post(format!("{url}/upload?until=completed"))
        .header("content-type", "text/csv")
        .header("prefer", "wait=30")
        .body(txpipe_tests::valid_csv("lp-wait", 3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["preference-applied"], "wait=30");
    assert_eq!(r.json::<Json>().await.unwrap()["status"], "completed");
    let names = base.names();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let bindings = loop {
        let listed = rabbitmqctl(&[
            "list_bindings",
            "-p",
            &loaded.vhost,
            "source_name",
            "destination_name",
            "routing_key",
            "--no-table-headers",
            "--quiet",
        ])
        .unwrap();
        let own: Vec<String> = listed
            .lines()
            .filter(|l| l.contains(&names.gateway_queue_prefix()))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if own.len() >= 6 || tokio::time::Instant::now() > deadline {
            break own;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for wanted in [
        "txpipe.pipeline file.validated",
        "txpipe.pipeline file.rejected",
        "txpipe.notifications file.completed",
        "txpipe.notifications file.rejected",
        "txpipe.notifications file.failed",
    ] {
        let (exchange, key) = wanted.split_once(' ').unwrap();
        assert!(
            bindings.iter().any(|b| b.starts_with(exchange) && b.ends_with(key)),
            "the gateway's own queue is bound to {wanted}: {bindings:?}"
        );
    }

    // what each user must never do
    let refused = |what: &str, result: Result<(), String>| {
        let err = result.expect_err(&format!("{what} must be refused"));
        assert!(err.contains("ACCESS_REFUSED") || err.contains("403"), "{what}: {err}");
    };
    let consume = |deps: Deps, queue: String| async move {
        let ch = deps.broker.channel().await.map_err(|e| e.to_string())?;
        ch.basic_consume(queue.as_str().into(), "lp-test".into(), Default::default(), Default::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    refused(
        "the gateway consuming the validator's queue",
        consume(gateway.clone(), names.queue(Stage::Validator)).await,
    );
    refused(
        "the validator consuming the notifier's queue",
        consume(workers[0].clone(), names.queue(Stage::Notifier)).await,
    );
    refused("the gateway consuming the DLQ", consume(gateway.clone(), names.dead_letter_queue()).await);
    let forged = StageMessage::uploaded(FileId::new(), "uploads/forged.csv".into());
    let to_pipeline = Outgoing { routing_key: "file.validated".into(), ..forged.outgoing(&names) };
    refused(
        "the notifier publishing to the pipeline exchange",
        workers[2].publisher.publish(&to_pipeline).await.map_err(|e| e.to_string()),
    );
    let note = Outgoing { exchange: names.notifications_exchange(), ..forged.outgoing(&names) };
    refused("the gateway publishing a notification", gateway.publisher.publish(&note).await.map_err(|e| e.to_string()));

    stop.cancel();
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    gateway.broker.close().await;
    for d in &workers {
        d.broker.close().await;
    }
    drop(loaded);
}
