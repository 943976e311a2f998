//! `txpipe provision` and `txpipe teardown`: create or remove everything a namespace uses
//! (bucket or directory, both tables, the broker topology), idempotently, saying what was done.

use txpipe_common::amqp::Broker;
use txpipe_common::config::{Settings, StorageKind};
use txpipe_common::error::StartupError;
use txpipe_common::storage::{aws, local::LocalLayout, provision as aws_provision, sqlite::SqliteStore};

/// The S3 store and DynamoDB client for `settings`, from `given` or the SDK's own settings.
async fn aws_clients(
    settings: &Settings,
    given: Option<&aws_config::SdkConfig>,
) -> (aws_config::SdkConfig, aws::S3ObjectStore, aws_sdk_dynamodb::Client) {
    let sdk = match given {
        Some(c) => c.clone(),
        None => aws::load_sdk_config(settings).await,
    };
    let s3 = aws::S3ObjectStore::new(&sdk, settings);
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    (sdk, s3, ddb)
}

/// Creates the namespace's storage and topology. `sdk` overrides the AWS SDK's own settings.
pub async fn provision(
    settings: &Settings,
    sdk_config: Option<&aws_config::SdkConfig>,
) -> Result<Vec<String>, StartupError> {
    let names = settings.names();
    let mut done = match settings.storage {
        StorageKind::Local => {
            // opening creates the directory and the tables
            txpipe_common::storage::Storage::open(settings).await?;
            let layout = LocalLayout::of(settings);
            vec![format!(
                "local storage ready: objects in table {} (up to {} KiB) and under {} (larger), tables {}, {}, {}, {} and {}, and the view {} in {}",
                names.bucket(),
                txpipe_common::storage::local::IN_DATABASE_MAX / 1024,
                layout.objects_dir().display(),
                names.status_table(),
                names.transactions_table(),
                names.transaction_earlier_versions_table(),
                names.api_keys_table(),
                names.idempotency_table(),
                names.transaction_versions_table(),
                layout.database().display()
            )]
        }
        StorageKind::Aws => {
            let (sdk, s3, ddb) = aws_clients(settings, sdk_config).await;
            aws_provision::provision(&s3, &ddb, &names, sdk.region().map(|r| r.as_ref())).await?
        }
    };
    let broker = Broker::connect(settings).await?;
    broker.declare_all().await?;
    broker.close().await;
    let queues: Vec<String> = txpipe_common::stage::Stage::ALL.iter().map(|s| names.queue(*s)).collect();
    done.push(format!(
        "declared exchanges {}, {}, {} and queues {}, {}",
        names.pipeline_exchange(),
        names.notifications_exchange(),
        names.dead_letter_exchange(),
        queues.join(", "),
        names.dead_letter_queue()
    ));
    Ok(done)
}

/// Removes the namespace's storage (with its data) and topology.
pub async fn teardown(
    settings: &Settings,
    sdk_config: Option<&aws_config::SdkConfig>,
) -> Result<Vec<String>, StartupError> {
    let names = settings.names();
    let mut done = match settings.storage {
        StorageKind::Local => {
            let layout = LocalLayout::of(settings);
            let db = SqliteStore::open(&layout.database(), &names).await?;
            db.drop_tables().await?;
            let dir = layout.objects_dir();
            let _ = std::fs::remove_dir_all(&dir);
            vec![
                // every table drop_tables drops, named as in the database
                format!(
                    "dropped tables {}, {}, {}, {}, {}, {}-usage and {}, and the view {}",
                    names.bucket(),
                    names.status_table(),
                    names.transactions_table(),
                    names.transaction_earlier_versions_table(),
                    names.api_keys_table(),
                    names.api_keys_table(),
                    names.idempotency_table(),
                    names.transaction_versions_table(),
                ),
                format!("removed {}", dir.display()),
            ]
        }
        StorageKind::Aws => {
            let (_, s3, ddb) = aws_clients(settings, sdk_config).await;
            aws_provision::teardown(&s3, &ddb, &names).await?
        }
    };
    let broker = Broker::connect(settings).await?;
    broker.teardown().await?;
    broker.close().await;
    done.push(format!("deleted the exchanges and queues of namespace {}", names.namespace()));
    Ok(done)
}
