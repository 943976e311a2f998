//! The API-key table on DynamoDB: one table `{ns}-api-keys` keyed by `pk`, holding three kinds
//! of item, so one table serves every lookup without an index:
//!
//! - `key#{hash}`: the key's record, found by the hash of a presented key (every request);
//! - `name#{name}`: claims the name (written with the key item in one transaction, both
//!   conditional, so neither a name nor a hash is ever taken twice) and points at the hash;
//! - `usage#{name}#{day}`: the day's upload count, raised by `UpdateItem` `ADD` under a
//!   `ConditionExpression` (`count < limit`), so every replica shares one count and none can
//!   push it past the limit; `expires_at` lets DynamoDB's TTL remove old days.

use super::aws::{classify, get_s, is_code, s, DynamoStore};
use super::{ApiKeyRecord, ApiKeyStore, QuotaUse, StorageError};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, Put, ReturnValue, TransactWriteItem};
use chrono::{DateTime, NaiveDate, Utc};
use std::collections::HashMap;

/// How long a day's counter is kept (DynamoDB's TTL removes it some time after).
const USAGE_KEPT_DAYS: i64 = 2;

fn key_pk(hash: &str) -> AttributeValue {
    s(format!("key#{hash}"))
}

fn name_pk(name: &str) -> AttributeValue {
    s(format!("name#{name}"))
}

fn usage_pk(name: &str, day: NaiveDate) -> AttributeValue {
    s(format!("usage#{name}#{day}"))
}

fn to_json(key: &ApiKeyRecord) -> String {
    serde_json::to_string(key).expect("a key record always serializes")
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Result<ApiKeyRecord, StorageError> {
    serde_json::from_str(get_s(item, "record")?).map_err(|e| StorageError::corrupt("API key record").with_source(e))
}

fn put(table: &str, item: HashMap<String, AttributeValue>) -> TransactWriteItem {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .expect("table and item are set");
    TransactWriteItem::builder().put(put).build()
}

impl DynamoStore {
    async fn key_item(&self, pk: AttributeValue) -> Result<Option<HashMap<String, AttributeValue>>, StorageError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.keys_table)
            .key("pk", pk)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("reading an API key", e))?;
        Ok(out.item)
    }
}

#[async_trait]
impl ApiKeyStore for DynamoStore {
    async fn create(&self, key: &ApiKeyRecord) -> Result<(), StorageError> {
        let name_item = HashMap::from([("pk".into(), name_pk(&key.name)), ("hash".into(), s(&key.hash))]);
        let key_item = HashMap::from([
            ("pk".into(), key_pk(&key.hash)),
            ("name".into(), s(&key.name)),
            ("record".into(), s(to_json(key))),
        ]);
        let result = self
            .client
            .transact_write_items()
            .transact_items(put(&self.keys_table, name_item))
            .transact_items(put(&self.keys_table, key_item))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "TransactionCanceledException") => {
                Err(StorageError::already_exists(format!("API key {}", key.name)).with_source(e))
            }
            Err(e) => Err(classify("storing an API key", e)),
        }
    }

    async fn get_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StorageError> {
        self.key_item(key_pk(hash)).await?.as_ref().map(from_item).transpose()
    }

    async fn list(&self) -> Result<Vec<ApiKeyRecord>, StorageError> {
        let mut keys = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.keys_table)
                .filter_expression("begins_with(pk, :p)")
                .expression_attribute_values(":p", s("key#"))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("listing API keys", e))?;
            for item in out.items() {
                keys.push(from_item(item)?);
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(keys)
    }

    async fn revoke(&self, name: &str, at: DateTime<Utc>) -> Result<(), StorageError> {
        let unknown = || StorageError::not_found(format!("API key {name}"));
        let claim = self.key_item(name_pk(name)).await?.ok_or_else(unknown)?;
        let hash = get_s(&claim, "hash")?.to_owned();
        let mut key = from_item(&self.key_item(key_pk(&hash)).await?.ok_or_else(unknown)?)?;
        if key.revoked_at.is_some() {
            return Ok(());
        }
        key.revoked_at = Some(at);
        self.client
            .update_item()
            .table_name(&self.keys_table)
            .key("pk", key_pk(&hash))
            .update_expression("SET #r = :r")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#r", "record")
            .expression_attribute_values(":r", s(to_json(&key)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("revoking an API key", e))
    }

    async fn consume(&self, name: &str, day: NaiveDate, limit: u64) -> Result<QuotaUse, StorageError> {
        let expires = day.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp()).unwrap_or(0) + USAGE_KEPT_DAYS * 86_400;
        let result = self
            .client
            .update_item()
            .table_name(&self.keys_table)
            .key("pk", usage_pk(name, day))
            .update_expression("ADD #c :one SET #e = :e")
            .condition_expression("attribute_not_exists(#c) OR #c < :limit")
            .expression_attribute_names("#c", "count")
            .expression_attribute_names("#e", "expires_at")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":limit", AttributeValue::N(limit.to_string()))
            .expression_attribute_values(":e", AttributeValue::N(expires.to_string()))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let count = out
                    .attributes()
                    .and_then(|a| a.get("count"))
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| StorageError::corrupt("the upload counter's new value"))?;
                Ok(QuotaUse::Counted(count))
            }
            Err(e) if is_code(&e, "ConditionalCheckFailedException") => Ok(QuotaUse::Exhausted),
            Err(e) => Err(classify("counting an upload", e)),
        }
    }

    async fn give_back(&self, name: &str, day: NaiveDate) -> Result<(), StorageError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.keys_table)
            .key("pk", usage_pk(name, day))
            .update_expression("ADD #c :minus")
            .condition_expression("#c > :zero")
            .expression_attribute_names("#c", "count")
            .expression_attribute_values(":minus", AttributeValue::N("-1".into()))
            .expression_attribute_values(":zero", AttributeValue::N("0".into()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "ConditionalCheckFailedException") => Ok(()),
            Err(e) => Err(classify("giving back an upload", e)),
        }
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.describe(&self.keys_table).await
    }
}
