//! `txpipe provision` / `txpipe teardown` for the aws backend: create or remove the bucket
//! and the tables of a namespace (status, transactions, API keys, idempotency keys),
//! idempotently, saying what was done.

use super::aws::{
    S3ObjectStore, LISTED_KEY, LISTING_INDEX, LISTING_KEY, OWNER_INDEX, OWNER_KEY, UNANNOUNCED_INDEX, UNANNOUNCED_KEY,
    UNANNOUNCED_SINCE, WORKING_INDEX, WORKING_KEY, WORKING_SINCE,
};
use super::StorageError;
use crate::names::Names;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexUpdate, KeySchemaElement, KeyType, PointInTimeRecoverySpecification, Projection,
    ProjectionType, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration, Delete, ObjectIdentifier};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use std::time::Duration;

fn fail<E>(what: &str, e: aws_sdk_s3::error::SdkError<E, HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    super::aws::classify(what, e)
}

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder().attribute_name(name).key_type(kind).build().expect("complete key")
}

fn string_attr(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("complete attribute")
}

/// Creates what is missing: the bucket, the status table, the transactions and
/// transaction-versions tables, the API-key table (with a TTL on old upload counters), the
/// idempotency-key table (with a TTL on records past their day); turns on point-in-time
/// recovery where the service supports it (not for idempotency keys: a day's worth of
/// ephemeral records).
pub async fn provision(
    s3: &S3ObjectStore,
    ddb: &aws_sdk_dynamodb::Client,
    names: &Names,
    region: Option<&str>,
) -> Result<Vec<String>, StorageError> {
    let mut done = Vec::new();
    let bucket = names.bucket();
    let mut create = s3.client().create_bucket().bucket(&bucket);
    if let Some(r) = region.filter(|r| *r != "us-east-1") {
        create = create.create_bucket_configuration(
            CreateBucketConfiguration::builder().location_constraint(BucketLocationConstraint::from(r)).build(),
        );
    }
    match create.send().await {
        Ok(_) => done.push(format!("created S3 bucket {bucket}")),
        Err(e) if matches!(e.code(), Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")) => {
            done.push(format!("S3 bucket {bucket} already exists"))
        }
        Err(e) => return Err(fail(&format!("creating S3 bucket {bucket}"), e)),
    }

    let status = names.status_table();
    // sparse: only unannounced uploads carry its keys; the sweeper needs just their ids
    let unannounced = GlobalSecondaryIndex::builder()
        .index_name(UNANNOUNCED_INDEX)
        .key_schema(key(UNANNOUNCED_KEY, KeyType::Hash))
        .key_schema(key(UNANNOUNCED_SINCE, KeyType::Range))
        .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
        .build()
        .expect("complete index");
    // sparse too: only files in a working status carry its keys (the stuck-file sweep's query)
    let working = GlobalSecondaryIndex::builder()
        .index_name(WORKING_INDEX)
        .key_schema(key(WORKING_KEY, KeyType::Hash))
        .key_schema(key(WORKING_SINCE, KeyType::Range))
        .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
        .build()
        .expect("complete index");
    // GET /files: sparse too (only announced files), keys only (written once per file)
    let listing = |name: &str, hash: &str| {
        GlobalSecondaryIndex::builder()
            .index_name(name)
            .key_schema(key(hash, KeyType::Hash))
            .key_schema(key(LISTING_KEY, KeyType::Range))
            .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
            .build()
            .expect("complete index")
    };
    // a table from an older txpipe gets the ones it lacks, one at a time
    let indexes = [unannounced, working, listing(OWNER_INDEX, OWNER_KEY), listing(LISTING_INDEX, LISTED_KEY)];
    let mut req = ddb
        .create_table()
        .table_name(&status)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string_attr("file_id"))
        .key_schema(key("file_id", KeyType::Hash));
    for attr in index_attributes(&indexes) {
        req = req.attribute_definitions(string_attr(&attr));
    }
    for index in &indexes {
        req = req.global_secondary_indexes(index.clone());
    }
    done.push(create_table(&status, req).await?);
    for index in indexes {
        if let Some(added) = add_missing_index(ddb, &status, index).await? {
            done.push(added);
        }
    }

    // the current version of each transaction, keyed as in the seed
    let tx = names.transactions_table();
    let req = ddb
        .create_table()
        .table_name(&tx)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string_attr("transaction_id"))
        .key_schema(key("transaction_id", KeyType::Hash));
    done.push(create_table(&tx, req).await?);
    // every version by the file that wrote it: a file's rows are one Query
    let versions = names.transaction_versions_table();
    let req = ddb
        .create_table()
        .table_name(&versions)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string_attr("file_id"))
        .attribute_definitions(string_attr("transaction_id"))
        .key_schema(key("file_id", KeyType::Hash))
        .key_schema(key("transaction_id", KeyType::Range));
    done.push(create_table(&versions, req).await?);

    let keys = names.api_keys_table();
    let req = ddb
        .create_table()
        .table_name(&keys)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string_attr("pk"))
        .key_schema(key("pk", KeyType::Hash));
    done.push(create_table(&keys, req).await?);
    wait_active(ddb, &keys).await?;
    done.push(expire_on(ddb, &keys, "old upload counters expire").await);

    // a key's uploads by Idempotency-Key, each record kept a day
    let idem = names.idempotency_table();
    let req = ddb
        .create_table()
        .table_name(&idem)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string_attr("key"))
        .key_schema(key("key", KeyType::Hash));
    done.push(create_table(&idem, req).await?);
    wait_active(ddb, &idem).await?;
    done.push(expire_on(ddb, &idem, "idempotency keys are forgotten after their day").await);

    for table in [&status, &tx, &versions, &keys] {
        wait_active(ddb, table).await?;
        let pitr =
            PointInTimeRecoverySpecification::builder().point_in_time_recovery_enabled(true).build().expect("complete");
        match ddb.update_continuous_backups().table_name(table).point_in_time_recovery_specification(pitr).send().await
        {
            Ok(_) => done.push(format!("point-in-time recovery on for {table}")),
            Err(e) => done.push(format!(
                "point-in-time recovery not turned on for {table} (the service refused: {})",
                e.code().unwrap_or("unsupported")
            )),
        }
    }
    Ok(done)
}

/// Turns on DynamoDB's TTL on `expires_at` for `table`, saying what it did.
async fn expire_on(ddb: &aws_sdk_dynamodb::Client, table: &str, why: &str) -> String {
    let ttl = TimeToLiveSpecification::builder().enabled(true).attribute_name("expires_at").build().expect("complete");
    match ddb.update_time_to_live().table_name(table).time_to_live_specification(ttl).send().await {
        Ok(_) => format!("TTL on expires_at for {table} ({why})"),
        // already on, or not supported by this server: expired items are then only kept (every
        // read treats them as gone)
        Err(e) => format!("TTL not changed for {table} ({})", e.code().unwrap_or("unsupported")),
    }
}

async fn create_table(
    table: &str,
    req: aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder,
) -> Result<String, StorageError> {
    match req.send().await {
        Ok(_) => Ok(format!("created DynamoDB table {table}")),
        Err(e) if e.code() == Some("ResourceInUseException") => Ok(format!("DynamoDB table {table} already exists")),
        Err(e) => Err(fail(&format!("creating DynamoDB table {table}"), e)),
    }
}

/// The attributes the indexes are keyed by, each once (all strings).
fn index_attributes(indexes: &[GlobalSecondaryIndex]) -> Vec<String> {
    let mut attrs: Vec<String> =
        indexes.iter().flat_map(|i| i.key_schema().iter().map(|k| k.attribute_name().to_owned())).collect();
    attrs.sort();
    attrs.dedup();
    attrs
}

/// Adds `index` to a table provisioned before it existed (a status table from an older
/// txpipe), and waits for it to be built (DynamoDB builds one new index at a time).
async fn add_missing_index(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    index: GlobalSecondaryIndex,
) -> Result<Option<String>, StorageError> {
    let out = ddb.describe_table().table_name(table).send().await.map_err(|e| fail("describing a table", e))?;
    let name = index.index_name().to_owned();
    let has = out.table().map(|t| t.global_secondary_indexes().iter().any(|i| i.index_name() == Some(name.as_str())));
    if has != Some(false) {
        return Ok(None);
    }
    let create = CreateGlobalSecondaryIndexAction::builder()
        .index_name(&name)
        .set_key_schema(Some(index.key_schema().to_vec()))
        .set_projection(index.projection().cloned())
        .build()
        .map_err(|e| StorageError::misconfigured("building an index update").with_source(e))?;
    let mut update = ddb.update_table().table_name(table);
    for attr in index_attributes(std::slice::from_ref(&index)) {
        update = update.attribute_definitions(string_attr(&attr));
    }
    update
        .global_secondary_index_updates(GlobalSecondaryIndexUpdate::builder().create(create).build())
        .send()
        .await
        .map_err(|e| fail(&format!("adding index {name} to {table}"), e))?;
    wait_active(ddb, table).await?;
    for _ in 0..600 {
        let out = ddb.describe_table().table_name(table).send().await.map_err(|e| fail("describing a table", e))?;
        let status = out.table().and_then(|t| {
            t.global_secondary_indexes()
                .iter()
                .find(|i| i.index_name() == Some(name.as_str()))
                .and_then(|i| i.index_status())
        });
        if matches!(status, None | Some(aws_sdk_dynamodb::types::IndexStatus::Active)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Some(format!("added index {name} to DynamoDB table {table}")))
}

async fn wait_active(ddb: &aws_sdk_dynamodb::Client, table: &str) -> Result<(), StorageError> {
    for _ in 0..120 {
        let out = ddb.describe_table().table_name(table).send().await.map_err(|e| fail("describing a table", e))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(StorageError::unavailable(format!("DynamoDB table {table} did not become ACTIVE within a minute")))
}

/// Removes the bucket (emptying it first) and the tables; what is already gone is skipped.
pub async fn teardown(
    s3: &S3ObjectStore,
    ddb: &aws_sdk_dynamodb::Client,
    names: &Names,
) -> Result<Vec<String>, StorageError> {
    let mut done = Vec::new();
    let bucket = names.bucket();
    let mut removed = 0usize;
    let mut token = None;
    loop {
        let page = match s3.client().list_objects_v2().bucket(&bucket).set_continuation_token(token.take()).send().await
        {
            Ok(p) => p,
            Err(e) if e.code() == Some("NoSuchBucket") => {
                done.push(format!("S3 bucket {bucket} does not exist"));
                break;
            }
            Err(e) => return Err(fail(&format!("listing S3 bucket {bucket}"), e)),
        };
        let ids: Vec<ObjectIdentifier> = page
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .map(|k| ObjectIdentifier::builder().key(k).build().expect("key set"))
            .collect();
        if !ids.is_empty() {
            removed += ids.len();
            let del = Delete::builder().set_objects(Some(ids)).quiet(true).build().expect("objects set");
            s3.client()
                .delete_objects()
                .bucket(&bucket)
                .delete(del)
                .send()
                .await
                .map_err(|e| fail("emptying the bucket", e))?;
        }
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_owned()),
            None => {
                match s3.client().delete_bucket().bucket(&bucket).send().await {
                    Ok(_) => done.push(format!("deleted S3 bucket {bucket} ({removed} objects)")),
                    Err(e) if e.code() == Some("NoSuchBucket") => {
                        done.push(format!("S3 bucket {bucket} does not exist"))
                    }
                    Err(e) => return Err(fail(&format!("deleting S3 bucket {bucket}"), e)),
                }
                break;
            }
        }
    }
    for table in [
        names.status_table(),
        names.transactions_table(),
        names.transaction_versions_table(),
        names.api_keys_table(),
        names.idempotency_table(),
    ] {
        match ddb.delete_table().table_name(&table).send().await {
            Ok(_) => done.push(format!("deleted DynamoDB table {table}")),
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                done.push(format!("DynamoDB table {table} does not exist"))
            }
            Err(e) => return Err(fail(&format!("deleting DynamoDB table {table}"), e)),
        }
    }
    Ok(done)
}
