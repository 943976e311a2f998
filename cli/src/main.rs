//! The `txpipe` command: run the fleet on one machine, manage the topology and API keys, talk
//! to a gateway, benchmark the validator.

use anyhow::bail;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use txpipe_cli::{commands, dlq};
use txpipe_common::auth::{KeyError, KeyLimits};
use txpipe_common::config::AuthMode;
use txpipe_common::stage::Service;
use txpipe_common::storage::{Storage, StorageErrorKind};
use txpipe_common::{amqp::Broker, Deps, Settings};

#[derive(Parser)]
#[command(name = "txpipe", version, about = "Ingest CSV files of financial transactions over RabbitMQ")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway and all three workers in this process (embedded storage by default).
    Up,
    /// Declare (`up`) or delete (`down`) the namespace's exchanges and queues.
    Topology {
        #[arg(value_parser = ["up", "down"])]
        action: String,
    },
    /// Create the namespace's bucket and tables (or local directory and tables) and topology.
    Provision,
    /// Delete the namespace's bucket, tables and topology, with their data.
    Teardown,
    /// Upload CSV files to a running gateway; with --wait, wait for each one's final status.
    Upload(commands::UploadArgs),
    /// Show a file's status from a running gateway; with --watch, follow it to a final status.
    Status(commands::StatusArgs),
    /// List your files (admin keys: every file), newest first.
    Files(commands::FilesArgs),
    /// Check CSV files against the contract offline, with the validator's own code.
    Validate(commands::ValidateArgs),
    /// Create, list and revoke API keys (in the storage the settings name).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Inspect and re-drive the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Re-drive a failed file from its stored object (publishes the message its failed stage consumes).
    Retry { file_id: String },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (the only time it is shown).
    Create {
        name: String,
        /// Uploads a UTC day (default TXPIPE_DAILY_QUOTA, 1000).
        #[arg(long)]
        daily_quota: Option<u64>,
        /// Requests a second (default TXPIPE_RATE_PER_SECOND).
        #[arg(long)]
        rate: Option<f64>,
        /// Requests at once above the rate (default TXPIPE_RATE_BURST).
        #[arg(long)]
        burst: Option<u32>,
        /// May read every tenant's files.
        #[arg(long)]
        admin: bool,
        /// Print one JSON object on one line.
        #[arg(long)]
        json: bool,
    },
    /// List the keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it is refused from then on (its name stays taken).
    Revoke { name: String },
    /// Keep a working key in FILE (mode 0600): the one there if it is still valid, else a new
    /// one named NAME (or NAME-… if taken). For deployments: e.g. Prometheus's credentials file.
    Ensure {
        name: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        admin: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters: position, stage, reason, file, time, count.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole (headers and body), by its position in `dlq list`.
    Show { index: usize },
    /// Send dead letters back to the exchange and routing key they came from.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only say what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete every dead letter (asks first, unless --yes).
    Purge {
        #[arg(long)]
        yes: bool,
    },
}

#[derive(clap::Args)]
struct FilterArgs {
    /// Only dead letters of this stage (validator, transformer, notifier).
    #[arg(long)]
    stage: Option<String>,
    /// Only dead letters about this file.
    #[arg(long)]
    file_id: Option<String>,
    /// Only dead letters whose class or reason contains this text (e.g. delivery_limit).
    #[arg(long)]
    reason: Option<String>,
}

impl FilterArgs {
    fn parse(self) -> anyhow::Result<dlq::Filter> {
        let file_id = match self.file_id {
            Some(f) => Some(f.parse().map_err(|_| anyhow::anyhow!("--file-id {f:?} is not a file id"))?),
            None => None,
        };
        if let Some(s) = self.stage.as_deref().filter(|s| txpipe_common::stage::Stage::parse(s).is_none()) {
            anyhow::bail!("--stage {s:?} is not a stage (validator, transformer or notifier)");
        }
        Ok(dlq::Filter { stage: self.stage, file_id, reason: self.reason })
    }
}

#[derive(Subcommand)]
enum Bench {
    /// Validate a generated file and bare-parse it with the csv crate; print MB/s and peak memory.
    Validate {
        /// Rows to generate.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Use this file instead of generating one.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Timed runs (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Upload N files of R rows through the whole pipeline and wait for every notification;
    /// print files/s, rows/s, latency percentiles and the broker's own ceiling for the same
    /// message pattern, measured in the same run.
    E2e {
        #[command(flatten)]
        options: txpipe_cli::bench_e2e::Options,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let command = match Cli::parse().command {
        Command::Up => return up().await,
        // the client commands have exit statuses of their own (0 done, 1 rejected, 2 failed)
        Command::Upload(args) => return commands::upload(args).await.into(),
        Command::Status(args) => return commands::status(args).await.into(),
        Command::Files(args) => return commands::files(args).await.into(),
        Command::Validate(args) => return commands::validate(args).await.into(),
        other => other,
    };
    match run(command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txpipe: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        // it has the life of a service, so `main` runs it
        Command::Up => bail!("txpipe up is run by main"),
        Command::Topology { action } => topology(&action).await,
        Command::Provision => {
            for line in txpipe_cli::provision::provision(&Settings::load()?, None).await? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Teardown => {
            for line in txpipe_cli::provision::teardown(&Settings::load()?, None).await? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Upload(_) | Command::Status(_) | Command::Files(_) | Command::Validate(_) => {
            bail!("the client commands are run by main")
        }
        Command::Keys { command } => keys_command(command).await,
        Command::Bench { which: Bench::Validate { rows, file, runs } } => bench(rows, file, runs),
        Command::Bench { which: Bench::E2e { options, json } } => {
            let report = txpipe_cli::bench_e2e::run(options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            Ok(())
        }
        Command::Dlq { command } => dlq_command(command).await,
        Command::Retry { file_id } => {
            let id = file_id.parse().map_err(|_| anyhow::anyhow!("{file_id:?} is not a file id"))?;
            let deps = Deps::connect(Settings::load()?).await?;
            let key = dlq::retry(&deps, id).await?;
            println!("re-driving file {id}: published {key}");
            deps.broker.close().await;
            Ok(())
        }
    }
}

/// `txpipe up`: the whole fleet in this process, with the life every service has. Prints a
/// ready-made curl line with the local API key (made on the first start).
async fn up() -> std::process::ExitCode {
    txpipe_common::service::main("txpipe", Service::Gateway.default_http_addr(), |listener, deps, shutdown| async move {
        let key = match deps.settings.auth {
            AuthMode::ApiKey => Some(txpipe_cli::keys::local_key(&deps.settings, deps.storage.keys.as_ref()).await?),
            AuthMode::None => None,
        };
        if let Ok(local) = listener.local_addr() {
            tracing::info!(addr = %local, data_dir = %deps.settings.data_dir.display(), "txpipe is up");
            let header = match &key {
                Some(k) => format!("-H 'x-api-key: {}' ", k.expose()),
                None => String::new(),
            };
            println!("txpipe is up: gateway on http://{local}");
            match &key {
                Some(_) => println!(
                    "API key for local use (admin; kept in {}):\n    {}",
                    txpipe_cli::keys::local_key_path(&deps.settings).display(),
                    header.trim_end()
                ),
                None => println!("TXPIPE_AUTH=none: no API key is asked (anyone who can reach the gateway may use it)"),
            }
            println!("upload with: curl {header}-H 'Content-Type: text/csv' --data-binary @file.csv http://{local}/upload");
        }
        txpipe_cli::fleet::run(listener, deps, shutdown).await.map_err(anyhow::Error::from)
    })
    .await
}

async fn keys_command(command: KeysCommand) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let storage = Storage::open(&settings).await?;
    let store = storage.keys.as_ref();
    match command {
        KeysCommand::Create { name, daily_quota, rate, burst, admin, json } => {
            let defaults = KeyLimits::defaults(&settings);
            let limits = KeyLimits {
                daily_quota: daily_quota.unwrap_or(defaults.daily_quota),
                rate_per_second: rate.unwrap_or(defaults.rate_per_second),
                burst: burst.unwrap_or(defaults.burst),
            };
            let (key, secret) =
                txpipe_common::auth::create_key(store, &name, admin, limits).await.map_err(|e| match e {
                    KeyError::Storage(s) if s.kind() == StorageErrorKind::AlreadyExists => {
                        anyhow::anyhow!("an API key named {name} exists already (names are never reused)")
                    }
                    other => other.into(),
                })?;
            if json {
                let mut v = txpipe_cli::keys::describe(&key);
                v["api_key"] = secret.expose().into();
                println!("{v}");
            } else {
                println!(
                    "created API key {name} (admin: {}, {} uploads a day, {}/s, burst {}); it is shown only now:",
                    if admin { "yes" } else { "no" },
                    key.daily_quota,
                    key.rate_per_second,
                    key.burst
                );
                println!("{}", secret.expose());
            }
        }
        KeysCommand::List { json } => {
            let keys = store.list().await?;
            if json {
                let all: Vec<_> = keys.iter().map(txpipe_cli::keys::describe).collect();
                println!("{}", serde_json::to_string(&all)?);
            } else {
                for line in txpipe_cli::keys::table(&keys) {
                    println!("{line}");
                }
            }
        }
        KeysCommand::Ensure { name, file, admin } => {
            txpipe_cli::keys::ensure_key(&settings, store, &name, admin, &file).await?;
            println!("a valid API key is in {}", file.display());
        }
        KeysCommand::Revoke { name } => match store.revoke(&name, chrono::Utc::now()).await {
            Ok(()) => println!("revoked API key {name}"),
            Err(e) if e.kind() == StorageErrorKind::NotFound => bail!("no API key named {name}"),
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}

async fn dlq_command(command: DlqCommand) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let broker = Broker::connect(&settings).await?;
    let dlq_name = settings.names().dead_letter_queue();
    match command {
        DlqCommand::List { filter, json } => {
            let filter = filter.parse()?;
            let filtered = filter.stage.is_some() || filter.file_id.is_some() || filter.reason.is_some();
            let items = dlq::list(&broker, &filter).await?;
            if json {
                println!("{}", serde_json::to_string(&items)?);
            } else {
                println!(
                    "{:>4}  {:<11}  {:<17}  {:<36}  {:<32}  {:>5}  REASON",
                    "#", "STAGE", "CLASS", "FILE_ID", "DEAD-LETTERED AT", "COUNT"
                );
                for d in &items {
                    println!(
                        "{:>4}  {:<11}  {:<17}  {:<36}  {:<32}  {:>5}  {}",
                        d.index,
                        d.stage.as_deref().unwrap_or("-"),
                        d.class,
                        d.file_id.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
                        d.dead_lettered_at.as_deref().unwrap_or("-"),
                        d.count,
                        d.reason
                    );
                }
                let matching = if filtered { " match the filter" } else { "" };
                println!("{} dead letter(s) in {dlq_name}{matching}", items.len());
            }
        }
        DlqCommand::Show { index } => {
            let items = dlq::list(&broker, &dlq::Filter::default()).await?;
            let d = items
                .iter()
                .find(|d| d.index == index)
                .ok_or_else(|| anyhow::anyhow!("no dead letter #{index} ({} in {dlq_name})", items.len()))?;
            println!("{}", serde_json::to_string_pretty(d)?);
        }
        DlqCommand::Replay { filter, dry_run } => {
            let done = dlq::replay(&broker, &filter.parse()?, dry_run).await?;
            for d in &done {
                println!(
                    "{} #{} {} → {} {}",
                    if dry_run { "would replay" } else { "replayed" },
                    d.index,
                    d.class,
                    d.exchange,
                    d.routing_key
                );
            }
            println!("{} {} message(s)", if dry_run { "would replay" } else { "replayed" }, done.len());
        }
        DlqCommand::Purge { yes } => {
            let n = dlq::count(&broker).await?;
            if !yes {
                use std::io::{BufRead, IsTerminal, Write};
                if !std::io::stdin().is_terminal() {
                    bail!("refusing to purge {n} message(s) from {dlq_name} without --yes");
                }
                print!("delete all {n} message(s) in {dlq_name}? [y/N] ");
                std::io::stdout().flush()?;
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    println!("nothing deleted");
                    return Ok(());
                }
            }
            println!("purged {} message(s) from {dlq_name}", dlq::purge(&broker).await?);
        }
    }
    broker.close().await;
    Ok(())
}

async fn topology(action: &str) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let broker = Broker::connect(&settings).await?;
    let ns = settings.namespace.clone();
    match action {
        "up" => {
            broker.declare_all().await?;
            println!("declared the exchanges and queues of namespace {ns}");
        }
        "down" => {
            // dead letters go with their queue: said, so nobody looks for them later (their
            // files keep their `*_failed` status, and `txpipe retry` re-drives them from it)
            let dlq = settings.names().dead_letter_queue();
            let dead = broker.queue_depth(&dlq).await.unwrap_or(0);
            broker.teardown().await?;
            println!("deleted the exchanges and queues of namespace {ns}");
            if dead > 0 {
                println!(
                    "deleted {dead} dead letter(s) with {dlq}; their files can still be re-driven with `txpipe retry FILE_ID`"
                );
            }
        }
        other => bail!("unknown action {other}"),
    }
    broker.close().await;
    Ok(())
}

fn bench(rows: u64, file: Option<PathBuf>, runs: u32) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = match file {
        Some(p) => p,
        None => {
            let p = dir.path().join("bench.csv");
            txpipe_cli::bench::generate(&p, rows)?;
            p
        }
    };
    txpipe_cli::bench::run(&path, runs)?.print();
    Ok(())
}
