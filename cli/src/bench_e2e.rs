//! `txpipe bench e2e`: the whole pipeline measured from outside, as a user sees it. Uploads N
//! files of R rows to a gateway (a running one, or `txpipe up` started on a fresh namespace),
//! C at a time or at an offered rate, listens on the notifications exchange, and reports
//! files/s, rows/s and the latency percentiles of the upload (its 202) and of upload →
//! `file.completed`. In the same run it measures the broker's own ceiling for the same
//! message pattern (four confirmed publishes and three acked consumes a file, on quorum queues
//! declared exactly as the pipeline's, the messages the pipeline's own: a small file travels
//! in two of them), so the figure is read as a ratio on a shared machine.

use crate::bench::peak_rss;
use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use txpipe_common::amqp::{Broker, Publisher};
use txpipe_common::messages::{Content, FileValidated, Outgoing, StageMessage};
use txpipe_common::stage::{RoutingKey, Stage};
use txpipe_common::{FileId, Settings};

/// What to run: the flags of `txpipe bench e2e`.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// A running gateway (default: start `txpipe up` on a fresh namespace, removed afterwards).
    #[arg(long)]
    pub gateway: Option<String>,
    /// With --gateway: the API key to send (as x-api-key).
    #[arg(long = "api-key", env = "TXPIPE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// With --gateway: its namespace, whose notifications exchange is listened on (default:
    /// TXPIPE_NAMESPACE).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Files to upload (after the warm-up).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub files: u64,
    /// Rows a file.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub rows: u64,
    /// Uploads in flight (closed loop), unless --rate is given.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Offer this many files a second instead (open loop: uploads start on schedule whatever
    /// the answers; latency under a steady load).
    #[arg(long, value_parser = positive_rate)]
    pub rate: Option<f64>,
    /// Files uploaded and awaited before timing.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    /// Skip measuring the broker's ceiling.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Also measure SQLite's own bulk rate for the same rows and tables (large files).
    #[arg(long)]
    pub sqlite_baseline: bool,
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err("a number of files a second above 0".into()),
    }
}

impl Options {
    /// How long to wait for notifications without one arriving: a large file may take a
    /// while to store before its notification comes.
    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(30) + Duration::from_micros(self.rows.saturating_mul(100))
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        // nearest rank
        let at = |p: f64| {
            let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1e3
        };
        Some(Self { p50: at(0.50), p90: at(0.90), p99: at(0.99), max: at(1.0) })
    }

    fn line(&self) -> String {
        format!(
            "p50 {:>7.1} ms  p90 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
            self.p50, self.p90, self.p99, self.max
        )
    }
}

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub files: u64,
    pub rows_per_file: u64,
    pub concurrency: Option<usize>,
    pub offered_rate: Option<f64>,
    pub accepted: u64,
    pub refused: u64,
    pub completed: u64,
    pub rejected: u64,
    pub failed: u64,
    pub missing: u64,
    pub seconds: f64,
    pub files_per_second: f64,
    pub rows_per_second: f64,
    pub upload_ms: Option<Percentiles>,
    pub completed_ms: Option<Percentiles>,
    /// Files a second the broker alone carries with the same pattern, in the same run: the
    /// median of [`CEILING_ROUNDS`] rounds.
    pub broker_ceiling_files_per_second: Option<f64>,
    /// Each round's files a second, in the order they ran.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub broker_ceiling_rounds: Vec<f64>,
    pub ratio_to_broker: Option<f64>,
    pub client_peak_rss_bytes: Option<u64>,
    /// S3 and DynamoDB requests a file took in the timed run, by `service/operation` (from
    /// the gateway's `txpipe_storage_calls_total`; only when the services run in the gateway's
    /// process, as with `txpipe up`); empty on embedded storage.
    pub storage_calls_per_file: BTreeMap<String, f64>,
    /// Peak resident memory of the `txpipe up` the run started (all four services).
    pub txpipe_peak_rss_bytes: Option<u64>,
    /// CPU time (user + system) a completed file over the timed run, in ms: of the `txpipe up`
    /// the run started, of the broker (when exactly one RabbitMQ node runs on this host) and of
    /// this client. The machine is shared by the three, so files/s follows their sum.
    pub cpu_ms_per_file: CpuPerFile,
    /// Rows a second SQLite itself stores of the same rows in the same two tables, in the same
    /// run (`--sqlite-baseline`).
    pub sqlite_rows_per_second: Option<f64>,
    /// Rows a second the transformer stored, from the files' `processing` → `processed` times
    /// (`--sqlite-baseline`: the storing alone, without the upload and the validation).
    pub stored_rows_per_second: Option<f64>,
    pub ratio_to_sqlite: Option<f64>,
}

impl Report {
    pub fn print(&self) {
        let how = match (self.offered_rate, self.concurrency) {
            (Some(r), _) => format!("{r} files/s offered"),
            (None, Some(c)) => format!("{c} in flight"),
            _ => String::new(),
        };
        println!("txpipe e2e: {} files of {} rows, {how}, against {}", self.files, self.rows_per_file, self.target);
        println!(
            "  accepted {}, refused {}; completed {}, rejected {}, failed {}, no notification {}",
            self.accepted, self.refused, self.completed, self.rejected, self.failed, self.missing
        );
        println!(
            "  throughput: {:.1} files/s, {:.0} rows/s ({:.2} s)",
            self.files_per_second, self.rows_per_second, self.seconds
        );
        if let Some(p) = &self.upload_ms {
            println!("  upload (202):         {}", p.line());
        }
        if let Some(p) = &self.completed_ms {
            println!("  upload → completed:   {}", p.line());
        }
        if !self.storage_calls_per_file.is_empty() {
            let total: f64 = self.storage_calls_per_file.values().sum();
            let each: Vec<String> = self.storage_calls_per_file.iter().map(|(op, n)| format!("{op} {n:.2}")).collect();
            println!("  storage calls a file: {total:.2} ({})", each.join(", "));
        }
        if let Some(line) = self.cpu_ms_per_file.line() {
            println!("  CPU a file: {line}");
        }
        if let Some(c) = self.broker_ceiling_files_per_second {
            let rounds: Vec<String> = self.broker_ceiling_rounds.iter().map(|r| format!("{r:.1}")).collect();
            println!(
                "broker ceiling (4 confirmed publishes + 3 acked consumes a file, same messages, same in-flight): {c:.1} files/s (median of {})",
                rounds.join(", ")
            );
        }
        if let Some(r) = self.ratio_to_broker {
            println!("ratio txpipe / broker: {r:.2}");
        }
        if let Some(b) = self.txpipe_peak_rss_bytes {
            println!("txpipe up peak memory (all four services): {:.1} MB", b as f64 / 1e6);
        }
        if let Some(stored) = self.stored_rows_per_second {
            println!("  stored (processing → processed): {stored:.0} rows/s");
        }
        if let (Some(rate), Some(r)) = (self.sqlite_rows_per_second, self.ratio_to_sqlite) {
            println!(
                "SQLite alone, same rows and tables, 20,000 rows a transaction: {rate:.0} rows/s; ratio stored / SQLite: {r:.2}"
            );
        }
    }
}

/// One CSV file of `rows` rows whose transaction ids are unique to (`run`, `n`).
fn csv_file(run: &str, n: u64, rows: u64) -> String {
    let mut s = String::with_capacity(64 + rows as usize * 90);
    s.push_str("transaction_id,amount,currency,timestamp,merchant,status\n");
    for i in 0..rows {
        s.push_str(&format!(
            "{run}-{n}-{i},{}.{:02},EUR,2024-05-{:02}T12:{:02}:00Z,Merchant {},completed\n",
            (n * 31 + i) % 10_000,
            i % 100,
            i % 28 + 1,
            i % 60,
            i % 97
        ));
    }
    s
}

/// `txpipe up` started for the run, on its own namespace and data directory.
struct Fleet {
    child: tokio::process::Child,
    settings: Settings,
    base: String,
    key: String,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let namespace = format!("bench-{}", &FileId::new().to_string()[24..]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut settings = settings.clone();
        settings.namespace = namespace.clone();
        settings.data_dir = dir.path().to_owned();
        // the bucket and tables (S3 and DynamoDB need them made; the embedded store makes its own)
        crate::provision::provision(&settings, None).await.context("provisioning the benchmark's namespace")?;
        let log = std::fs::File::create(dir.path().join("txpipe-up.log"))?;
        let exe = std::env::current_exe().context("finding the txpipe binary")?;
        let child = tokio::process::Command::new(exe)
            .arg("up")
            .env("TXPIPE_NAMESPACE", &namespace)
            .env("TXPIPE_DATA_DIR", dir.path())
            .env("TXPIPE_HTTP_ADDR", format!("127.0.0.1:{port}"))
            // the local key must not be what is measured
            .env("TXPIPE_DAILY_QUOTA", "1000000000")
            .env("TXPIPE_RATE_PER_SECOND", "1000000")
            .env("TXPIPE_RATE_BURST", "1000000")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting txpipe up")?;
        let base = format!("http://127.0.0.1:{port}");
        let key_path = crate::keys::local_key_path(&settings);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut fleet = Self { child, settings, base, key: String::new(), _dir: dir };
        loop {
            if let Some(status) = fleet.child.try_wait()? {
                let log = std::fs::read_to_string(fleet._dir.path().join("txpipe-up.log")).unwrap_or_default();
                bail!("txpipe up exited ({status}):\n{log}");
            }
            let healthy =
                http.get(format!("{}/readyz", fleet.base)).send().await.is_ok_and(|r| r.status().is_success());
            if healthy {
                if let Ok(key) = std::fs::read_to_string(&key_path) {
                    fleet.key = key.trim().to_owned();
                    return Ok(fleet);
                }
            }
            if Instant::now() > deadline {
                bail!("txpipe up did not come up within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The child's peak resident memory so far (Linux).
    fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// SIGTERM, as a user stops it; then its topology and storage go.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        if tokio::time::timeout(Duration::from_secs(40), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        crate::provision::teardown(&self.settings, None).await?;
        Ok(())
    }
}

/// Completion times by file id, as the notifications arrive.
#[derive(Default)]
struct Finished {
    at: HashMap<String, (Instant, String)>,
}

/// Listens on the namespace's notifications exchange (an exclusive queue bound to `#`).
async fn listen(broker: &Broker, finished: Arc<Mutex<Finished>>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let channel = broker.channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let exchange = broker.names().notifications_exchange();
    channel
        .queue_bind(
            queue.name().as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding to {exchange} (is the namespace right?)"))?;
    let mut consumer = channel
        .basic_consume(
            queue.name().as_str().into(),
            "bench-e2e".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    Ok(tokio::spawn(async move {
        let _channel = channel;
        while let Some(Ok(delivery)) = consumer.next().await {
            let now = Instant::now();
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&delivery.data) else { continue };
            let Some(id) = body.get("file_id").and_then(|v| v.as_str()) else { continue };
            let kind = delivery.routing_key.to_string();
            finished.lock().unwrap_or_else(|p| p.into_inner()).at.entry(id.to_owned()).or_insert((now, kind));
        }
    }))
}

/// What one upload came to.
struct Sent {
    started: Instant,
    answered: Instant,
    file_id: Option<String>,
}

async fn upload(http: &reqwest::Client, base: &str, key: &str, body: String) -> Sent {
    let started = Instant::now();
    let answer = http
        .post(format!("{base}/upload"))
        .header("x-api-key", key)
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await;
    let file_id = match answer {
        Ok(r) if r.status().as_u16() == 202 => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v.get("file_id").and_then(|f| f.as_str()).map(str::to_owned)),
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            eprintln!("upload refused: {status} {}", text.chars().take(200).collect::<String>());
            None
        }
        Err(e) => {
            eprintln!("upload failed: {e}");
            None
        }
    };
    Sent { started, answered: Instant::now(), file_id }
}

/// Uploads `count` files (numbered from `first`), C at a time or at the offered rate.
async fn upload_all(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    run: &str,
    first: u64,
    count: u64,
    opts: &Options,
) -> Vec<Sent> {
    offer(first..first + count, opts.rate, opts.concurrency, |n| {
        let (http, base, key, body) = (http.clone(), base.to_owned(), key.to_owned(), csv_file(run, n, opts.rows));
        async move { upload(&http, &base, &key, body).await }
    })
    .await
}

/// Runs `start(n)` for each `n`, `concurrency` at a time, or at `rate` a second whatever the
/// answers (open loop: bounded only so a stalled server cannot use up the client's memory);
/// the outcomes, in the order they finished.
async fn offer<T, F>(
    items: std::ops::Range<u64>,
    rate: Option<f64>,
    concurrency: usize,
    mut start: impl FnMut(u64) -> F,
) -> Vec<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(if rate.is_some() { 4096 } else { concurrency.max(1) }));
    let (first, began) = (items.start, tokio::time::Instant::now());
    let mut tasks = tokio::task::JoinSet::new();
    for n in items {
        if let Some(rate) = rate {
            tokio::time::sleep_until(began + Duration::from_secs_f64((n - first) as f64 / rate)).await;
        }
        let permit = limit.clone().acquire_owned().await.expect("never closed");
        let work = start(n);
        tasks.spawn(async move {
            let out = work.await;
            drop(permit);
            out
        });
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(done) = done {
            out.push(done);
        }
    }
    out
}

/// Waits until every accepted file has a notification, or none came for `idle`.
async fn await_all(finished: &Mutex<Finished>, ids: &[String], idle: Duration) {
    let (mut last_count, mut last_change) = (0, Instant::now());
    loop {
        let count = {
            let f = finished.lock().unwrap_or_else(|p| p.into_inner());
            ids.iter().filter(|id| f.at.contains_key(*id)).count()
        };
        if count == ids.len() {
            return;
        }
        if count != last_count {
            (last_count, last_change) = (count, Instant::now());
        } else if last_change.elapsed() > idle {
            eprintln!("no notification for {:?}; {} of {} files unaccounted for", idle, ids.len() - count, ids.len());
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs the benchmark.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let mut settings = Settings::load()?;
    let fleet = match &opts.gateway {
        Some(_) => None,
        None => Some(Fleet::start(&settings).await?),
    };
    let (base, key) = match (&fleet, &opts.gateway) {
        (Some(f), _) => (f.base.clone(), f.key.clone()),
        (None, Some(g)) => (
            g.trim_end_matches('/').to_owned(),
            opts.api_key.clone().context("--api-key (or TXPIPE_API_KEY) is needed with --gateway")?,
        ),
        (None, None) => unreachable!("a fleet is started when no gateway is given"),
    };
    match &fleet {
        Some(f) => settings = f.settings.clone(),
        None => {
            if let Some(ns) = &opts.namespace {
                settings.namespace = ns.clone();
            }
        }
    }
    let target = match &fleet {
        Some(f) => format!("txpipe up ({:?} storage, namespace {})", settings.storage, f.settings.namespace),
        None => format!("{base} (namespace {})", settings.namespace),
    };
    let mut result = measure(&opts, &settings, &base, &key, target, fleet.as_ref().and_then(|f| f.child.id())).await;
    if let (Ok(report), Some(f)) = (result.as_mut(), &fleet) {
        report.txpipe_peak_rss_bytes = f.peak_rss();
    }
    if let Some(f) = fleet {
        if let Err(e) = f.stop().await {
            eprintln!("stopping the benchmark's txpipe up: {e:#}");
        }
    }
    let mut report = result?;
    if !opts.no_ceiling {
        let mut rounds = Vec::with_capacity(CEILING_ROUNDS);
        for _ in 0..CEILING_ROUNDS {
            rounds.push(broker_ceiling(&settings, opts.files, opts.rows, opts.concurrency, opts.rate).await?);
        }
        let ceiling = median(&rounds);
        report.broker_ceiling_files_per_second = Some(ceiling);
        report.broker_ceiling_rounds = rounds;
        report.ratio_to_broker = Some(report.files_per_second / ceiling);
    }
    if opts.sqlite_baseline {
        let rate = sqlite_baseline(opts.files, opts.rows).await?;
        report.sqlite_rows_per_second = Some(rate);
        let stored = report.stored_rows_per_second.unwrap_or(report.rows_per_second);
        report.ratio_to_sqlite = Some(stored / rate);
    }
    report.client_peak_rss_bytes = peak_rss();
    Ok(report)
}

/// SQLite alone: rows like the run's (the same ids and values) inserted into the same table
/// and index (made by txpipe's own store on a scratch database: the same schema and pragmas,
/// `synchronous=FULL`; a first version is only a current row), 20,000 rows a transaction,
/// with prepared statements and a 64 MB page cache. Rows a second.
pub async fn sqlite_baseline(files: u64, rows: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let names = txpipe_common::Names::new("bench-sqlite")?;
    let path = dir.path().join("baseline.sqlite3");
    drop(txpipe_common::storage::sqlite::SqliteStore::open(&path, &names).await?);
    let quote = |t: String| format!("\"{t}\"");
    let tt = quote(names.transactions_table());
    let run = FileId::new().to_string().replace('-', "");
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let mut conn = rusqlite::Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "cache_size", -64_000)?;
        let cols = "transaction_id, file_id, amount, currency, timestamp, timestamp_epoch, merchant, status, \
                    processed_at, version";
        let into_current = format!("INSERT INTO {tt} ({cols}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)");
        let processed_at = chrono::Utc::now().to_rfc3339();
        let started = Instant::now();
        let mut pending = 0u64;
        let mut tx = conn.transaction()?;
        for n in 0..files {
            let file_id = FileId::new().to_string();
            for i in 0..rows {
                let id = format!("{}-{n}-{i}", &run[run.len() - 12..]);
                let amount = format!("{}.{:02}", (n * 31 + i) % 10_000, i % 100);
                let timestamp = format!("2024-05-{:02}T12:{:02}:00+00:00", i % 28 + 1, i % 60);
                let merchant = format!("Merchant {}", i % 97);
                tx.prepare_cached(&into_current)?.execute(rusqlite::params![
                    id,
                    file_id,
                    amount,
                    "EUR",
                    timestamp,
                    1_714_000_000i64,
                    merchant,
                    "completed",
                    processed_at,
                    1i64
                ])?;
                pending += 1;
                if pending == 20_000 {
                    tx.commit()?;
                    tx = conn.transaction()?;
                    pending = 0;
                }
            }
        }
        tx.commit()?;
        Ok((files * rows) as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}

async fn measure(
    opts: &Options,
    settings: &Settings,
    base: &str,
    key: &str,
    target: String,
    txpipe_pid: Option<u32>,
) -> anyhow::Result<Report> {
    let broker = Broker::connect(settings).await?;
    let finished = Arc::new(Mutex::new(Finished::default()));
    let listener = listen(&broker, finished.clone()).await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(4096).build()?;
    let run_id = FileId::new().to_string().replace('-', "");
    let run_id = &run_id[run_id.len() - 12..];
    if opts.warmup > 0 {
        let warm = upload_all(&http, base, key, run_id, 0, opts.warmup, opts).await;
        let ids: Vec<String> = warm.into_iter().filter_map(|s| s.file_id).collect();
        await_all(&finished, &ids, opts.idle_timeout()).await;
    }
    let calls_before = storage_calls(&http, base, key).await;
    // the processes whose CPU a file is reported: txpipe up, the broker, this client
    let pids = [txpipe_pid, broker_pid(), Some(std::process::id())];
    let cpu_before = pids.map(|p| p.and_then(cpu_time));
    let started = Instant::now();
    let sent = upload_all(&http, base, key, run_id, opts.warmup, opts.files, opts).await;
    let ids: Vec<String> = sent.iter().filter_map(|s| s.file_id.clone()).collect();
    await_all(&finished, &ids, opts.idle_timeout()).await;
    let cpu_after = pids.map(|p| p.and_then(cpu_time));
    listener.abort();
    broker.close().await;
    let calls_after = storage_calls(&http, base, key).await;
    let stored_rows_per_second =
        if opts.sqlite_baseline { storing_rate(&http, base, key, &ids, opts.rows).await } else { None };
    let done = finished.lock().unwrap_or_else(|p| p.into_inner());
    let (mut completed, mut rejected, mut failed, mut missing) = (0, 0, 0, 0);
    let mut last = started;
    let mut completed_ms = Vec::new();
    for s in &sent {
        let Some(id) = &s.file_id else { continue };
        match done.at.get(id) {
            None => missing += 1,
            Some((at, kind)) => {
                last = last.max(*at);
                match kind.as_str() {
                    "file.completed" => {
                        completed += 1;
                        completed_ms.push(at.saturating_duration_since(s.started));
                    }
                    "file.rejected" => rejected += 1,
                    _ => failed += 1,
                }
            }
        }
    }
    let seconds = last.duration_since(started).as_secs_f64().max(1e-9);
    let accepted = ids.len() as u64;
    Ok(Report {
        target,
        files: opts.files,
        rows_per_file: opts.rows,
        concurrency: opts.rate.is_none().then_some(opts.concurrency),
        offered_rate: opts.rate,
        accepted,
        refused: opts.files - accepted,
        completed,
        rejected,
        failed,
        missing,
        seconds,
        files_per_second: completed as f64 / seconds,
        rows_per_second: (completed * opts.rows) as f64 / seconds,
        upload_ms: Percentiles::of(sent.iter().map(|s| s.answered - s.started).collect()),
        completed_ms: Percentiles::of(completed_ms),
        broker_ceiling_files_per_second: None,
        broker_ceiling_rounds: Vec::new(),
        ratio_to_broker: None,
        client_peak_rss_bytes: None,
        txpipe_peak_rss_bytes: None,
        cpu_ms_per_file: CpuPerFile::between(cpu_before, cpu_after, completed),
        sqlite_rows_per_second: None,
        stored_rows_per_second,
        ratio_to_sqlite: None,
        storage_calls_per_file: calls_after
            .into_iter()
            .map(|(op, n)| {
                let d = n - calls_before.get(&op).copied().unwrap_or(0.0);
                (op, d / completed.max(1) as f64)
            })
            .filter(|(_, n)| *n > 0.0)
            .collect(),
    })
}

/// CPU time a completed file, in ms, by process (see [`Report::cpu_ms_per_file`]).
#[derive(Debug, Default, Serialize)]
pub struct CpuPerFile {
    pub txpipe: Option<f64>,
    pub broker: Option<f64>,
    pub client: Option<f64>,
}

impl CpuPerFile {
    fn line(&self) -> Option<String> {
        let parts: Vec<String> = [("txpipe up", self.txpipe), ("broker", self.broker), ("this client", self.client)]
            .into_iter()
            .filter_map(|(who, ms)| Some(format!("{who} {:.2} ms", ms?)))
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// From the CPU times of (txpipe up, the broker, this client) before and after `files`.
    fn between(before: [Option<Duration>; 3], after: [Option<Duration>; 3], files: u64) -> Self {
        let each = |i: usize| {
            let used = after[i]?.checked_sub(before[i]?)?;
            (files > 0).then(|| used.as_secs_f64() * 1e3 / files as f64)
        };
        Self { txpipe: each(0), broker: each(1), client: each(2) }
    }
}

/// Clock ticks a second of `/proc/<pid>/stat`'s times: USER_HZ, 100 on every architecture
/// txpipe is built for (x86_64, aarch64; only alpha and ia64 differ).
const USER_HZ: f64 = 100.0;

/// User + system CPU time of a process, from `/proc/<pid>/stat` (Linux; None elsewhere, or
/// once it is gone).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the fields after the command name, which is in parentheses and may hold spaces: utime
    // and stime are the 14th and 15th fields, the 12th and 13th after it
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

/// The RabbitMQ node on this host (the Erlang VM, `beam.smp`), if exactly one runs: with none
/// the broker is elsewhere, with several (a local cluster) which one carries the run's queues
/// is not known, and the broker's figure is left out.
fn broker_pid() -> Option<u32> {
    let mut found = std::fs::read_dir("/proc").ok()?.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim_end() == "beam.smp").then_some(pid)
    });
    match (found.next(), found.next()) {
        (Some(pid), None) => Some(pid),
        _ => None,
    }
}

/// Rows a second over the files' storing time (`processing` → `processed` in their status
/// history), for a few large files; None if a record cannot be read.
async fn storing_rate(http: &reqwest::Client, base: &str, key: &str, ids: &[String], rows: u64) -> Option<f64> {
    let mut seconds = 0.0;
    for id in ids.iter().take(10) {
        let record: serde_json::Value =
            http.get(format!("{base}/files/{id}")).header("x-api-key", key).send().await.ok()?.json().await.ok()?;
        let at = |status: &str| {
            record["history"].as_array()?.iter().find(|h| h["status"] == status)?["at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        };
        seconds += (at("processed")? - at("processing")?).num_milliseconds() as f64 / 1e3;
    }
    let files = ids.len().min(10) as f64;
    (seconds > 0.0).then(|| files * rows as f64 / seconds)
}

/// The gateway's `txpipe_storage_calls_total`, by `service/operation` (empty if unreadable).
async fn storage_calls(http: &reqwest::Client, base: &str, key: &str) -> BTreeMap<String, f64> {
    let Ok(answer) = http.get(format!("{base}/metrics")).header("x-api-key", key).send().await else {
        return BTreeMap::new();
    };
    let text = answer.text().await.unwrap_or_default();
    let label = |labels: &str, name: &str| {
        labels
            .split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\"")?.strip_suffix('"').map(str::to_owned))
    };
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("txpipe_storage_calls_total{")?;
            let (labels, value) = rest.split_once("} ")?;
            let op = format!("{}/{}", label(labels, "service")?, label(labels, "operation")?);
            Some((op, value.trim().parse::<f64>().ok()?))
        })
        .collect()
}

/// Rounds of the broker's ceiling a run measures, the median reported: one round of a few
/// thousand files lasts about a second, and on a shared machine one round varies by ±20 %.
pub const CEILING_ROUNDS: usize = 3;

/// The middle value (of an odd count; the upper middle of an even one).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The broker alone, carrying the pipeline's message pattern: a client publishes
/// `file.uploaded` (confirmed; C at a time, as uploads) and listens for the notifications; three stand-in stages each
/// consume their queue (prefetch as the workers'), publish the next message (confirmed) and
/// ack, the last one to the notifications exchange. The queues are the pipeline's own,
/// declared by txpipe on a namespace of the run's, removed afterwards. The messages are the
/// pipeline's own too: a file of `rows` rows small enough to travel in its messages
/// (`TXPIPE_INLINE_MAX_BYTES`) travels in `file.uploaded` and `file.validated` here as well,
/// since the broker then carries it twice a file. Returns files/s.
pub async fn broker_ceiling(
    settings: &Settings,
    files: u64,
    rows: u64,
    concurrency: usize,
    rate: Option<f64>,
) -> anyhow::Result<f64> {
    let mut settings = settings.clone();
    settings.namespace = format!("bench-ceiling-{}", &FileId::new().to_string()[24..]);
    let broker = Broker::connect(&settings).await?;
    broker.declare_all().await?;
    let names = broker.names().clone();
    let result = async {
        let mut stages = Vec::new();
        for stage in Stage::ALL {
            let publisher = broker.publisher().await?;
            let channel = broker.channel().await?;
            channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
            let mut consumer = channel
                .basic_consume(
                    names.queue(stage).as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let names = names.clone();
            stages.push(tokio::spawn(async move {
                let _channel = channel;
                while let Some(Ok(delivery)) = consumer.next().await {
                    let (publisher, names) = (publisher.clone(), names.clone());
                    tokio::spawn(async move {
                        let next = next_message(stage, &names, &delivery.data, rows);
                        if publish(&publisher, &next).await {
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                        }
                    });
                }
            }));
        }
        let finished = Arc::new(Mutex::new(Finished::default()));
        let listener = listen(&broker, finished.clone()).await?;
        let publisher = broker.publisher().await?;
        let started = Instant::now();
        // like an upload: the next file goes once the publish is confirmed
        let ids: Vec<String> = offer(0..files, rate, concurrency, |n| {
            let file_id = FileId::new();
            let msg = ceiling_upload(&names, file_id, csv_file("ceiling", n, rows), settings.inline_max_bytes);
            let publisher = publisher.clone();
            async move {
                publish(&publisher, &msg).await;
                file_id.to_string()
            }
        })
        .await;
        await_all(&finished, &ids, Duration::from_secs(30)).await;
        let seconds = started.elapsed().as_secs_f64();
        listener.abort();
        let arrived =
            ids.iter().filter(|id| finished.lock().unwrap_or_else(|p| p.into_inner()).at.contains_key(*id)).count();
        if arrived < ids.len() {
            bail!("the broker-ceiling run lost {} of {} messages", ids.len() - arrived, ids.len());
        }
        for s in stages {
            s.abort();
        }
        anyhow::Ok(files as f64 / seconds)
    }
    .await;
    broker.teardown().await?;
    broker.close().await;
    result
}

/// The ceiling's `file.uploaded` for a file of `csv`: carrying the file when the gateway
/// would (`inline_max_bytes`, `TXPIPE_INLINE_MAX_BYTES`).
fn ceiling_upload(names: &txpipe_common::Names, file_id: FileId, csv: String, inline_max_bytes: usize) -> Outgoing {
    let carried = (csv.len() <= inline_max_bytes).then_some(Content(csv));
    StageMessage::uploaded(file_id, names.object_key(&file_id)).with_content(carried).outgoing(names)
}

/// What a stand-in stage publishes for a message it consumed: the validator's passes the
/// file on when it came with the message, as the validator does.
fn next_message(stage: Stage, names: &txpipe_common::Names, body: &[u8], rows: u64) -> Outgoing {
    if stage == Stage::Validator {
        if let Ok(StageMessage::Uploaded(m)) = StageMessage::parse(RoutingKey::FileUploaded.as_str(), body) {
            let validated = FileValidated {
                file_id: m.file_id,
                object_key: m.object_key,
                row_count: rows,
                uploaded_by: m.uploaded_by,
                at: chrono::Utc::now(),
                content: m.content,
                stored: None,
            };
            return StageMessage::Validated(validated).outgoing(names);
        }
    }
    let file_id = txpipe_common::messages::file_id_of(body).map(|f| f.to_string()).unwrap_or_default();
    let (exchange, key) = match stage {
        Stage::Validator => (names.pipeline_exchange(), RoutingKey::FileValidated.as_str()),
        Stage::Transformer => (names.pipeline_exchange(), RoutingKey::FileProcessed.as_str()),
        Stage::Notifier => (names.notifications_exchange(), "file.completed"),
    };
    // about the size of the real messages (a notification carries the file's counts)
    let body = serde_json::json!({
        "file_id": file_id,
        "object_key": format!("uploads/{file_id}.csv"),
        "status": "completed",
        "records_processed": rows,
        "row_count": rows,
        "error_count": 0,
        "at": chrono::Utc::now(),
    });
    Outgoing {
        exchange,
        routing_key: key.to_owned(),
        body: body.to_string().into_bytes(),
        message_id: format!("{file_id}:{key}"),
        mandatory: stage != Stage::Notifier,
        headers: Vec::new(),
    }
}

async fn publish(publisher: &Publisher, msg: &Outgoing) -> bool {
    match publisher.publish(msg).await {
        Ok(()) => true,
        Err(e) => {
            eprintln!("broker ceiling: publish failed: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> txpipe_common::Names {
        txpipe_common::Names::new("bench-test").unwrap()
    }

    #[test]
    fn the_ceiling_is_the_median_of_its_rounds() {
        assert_eq!(median(&[2300.0, 1592.0, 2371.0]), 2300.0);
        assert_eq!(median(&[5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn the_ceilings_messages_carry_the_file_as_the_pipelines_do() {
        let (names, file_id, csv) = (names(), FileId::new(), csv_file("t", 1, 100));
        let upload = ceiling_upload(&names, file_id, csv.clone(), 16 * 1024);
        let parsed = StageMessage::parse(&upload.routing_key, &upload.body).unwrap();
        assert_eq!(parsed.content().map(|c| c.0.as_str()), Some(csv.as_str()), "a 100-row file travels");

        // the stand-in validator passes it on in file.validated, as the validator does
        let validated = next_message(Stage::Validator, &names, &upload.body, 100);
        assert_eq!(validated.routing_key, RoutingKey::FileValidated.as_str());
        match StageMessage::parse(&validated.routing_key, &validated.body).unwrap() {
            StageMessage::Validated(m) => {
                assert_eq!((m.file_id, m.row_count), (file_id, 100));
                assert_eq!(m.content.map(|c| c.0), Some(csv.clone()));
            }
            other => panic!("not file.validated: {other:?}"),
        }
        // and the transformer's file.processed does not
        let processed = next_message(Stage::Transformer, &names, &validated.body, 100);
        assert_eq!(processed.routing_key, RoutingKey::FileProcessed.as_str());
        assert!(StageMessage::parse(&processed.routing_key, &processed.body).unwrap().content().is_none());

        // a file over TXPIPE_INLINE_MAX_BYTES (0: never) travels as a claim check only
        let upload = ceiling_upload(&names, file_id, csv, 0);
        assert!(StageMessage::parse(&upload.routing_key, &upload.body).unwrap().content().is_none());
        let validated = next_message(Stage::Validator, &names, &upload.body, 100);
        assert!(StageMessage::parse(&validated.routing_key, &validated.body).unwrap().content().is_none());
    }
}
