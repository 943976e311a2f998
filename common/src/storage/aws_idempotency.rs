//! The idempotency-key table on DynamoDB: `{ns}-idempotency-keys`, keyed by `key` (the API
//! key's name and the SHA-256 of the `Idempotency-Key`). An item is claimed by one conditional
//! `PutItem` (the key is free, its record past `expires_at`, or its claim past `lease_until`),
//! renewed, completed or released by a write conditional on the claim's `token`. `expires_at` (seconds
//! since the epoch) is the table's TTL attribute; DynamoDB deletes expired items only some
//! time later, so every condition and read also treats them as gone.

use super::aws::{classify, get_s, is_code, s, DynamoStore};
use super::{Claim, IdempotencyStore, IdempotentUpload, NewClaim, StorageError};
use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use std::collections::HashMap;

/// How often a claim is tried again when the item it lost to vanished before it could be read.
const CLAIM_ATTEMPTS: usize = 4;

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Result<i64, StorageError> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| StorageError::corrupt(format!("idempotency item lacks number attribute {name}")))
}

#[async_trait]
impl IdempotencyStore for DynamoStore {
    async fn claim(&self, claim: &NewClaim) -> Result<Claim, StorageError> {
        let (now_s, now_ms) = (claim.now.timestamp(), claim.now.timestamp_millis());
        for _ in 0..CLAIM_ATTEMPTS {
            let item = HashMap::from([
                ("key".to_owned(), s(&claim.key)),
                ("token".to_owned(), s(&claim.token)),
                ("lease_until".to_owned(), n(claim.lease_until.timestamp_millis())),
                ("expires_at".to_owned(), n(claim.expires_at.timestamp())),
            ]);
            let put = self
                .client
                .put_item()
                .table_name(&self.idem_table)
                .set_item(Some(item))
                .condition_expression(
                    "attribute_not_exists(#k) OR #e <= :now_s OR (attribute_not_exists(#u) AND #l <= :now_ms)",
                )
                .expression_attribute_names("#k", "key")
                .expression_attribute_names("#e", "expires_at")
                .expression_attribute_names("#u", "upload")
                .expression_attribute_names("#l", "lease_until")
                .expression_attribute_values(":now_s", n(now_s))
                .expression_attribute_values(":now_ms", n(now_ms))
                .send()
                .await;
            match put {
                Ok(_) => return Ok(Claim::Claimed),
                Err(e) if is_code(&e, "ConditionalCheckFailedException") => {}
                Err(e) => return Err(classify("claiming an idempotency key", e)),
            }
            // held: say by what (a live claim, or a finished upload)
            let out = self
                .client
                .get_item()
                .table_name(&self.idem_table)
                .key("key", s(&claim.key))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| classify("reading an idempotency key", e))?;
            let Some(item) = out.item else { continue }; // released meanwhile: try again
            if number(&item, "expires_at")? <= now_s {
                continue; // expired meanwhile
            }
            return match item.get("upload") {
                Some(_) => {
                    let upload = serde_json::from_str(get_s(&item, "upload")?)
                        .map_err(|e| StorageError::corrupt("idempotency record").with_source(e))?;
                    Ok(Claim::Done(upload))
                }
                None => Ok(Claim::InFlight),
            };
        }
        Err(StorageError::unavailable("an idempotency key kept changing while it was claimed"))
    }

    async fn complete(&self, key: &str, token: &str, upload: &IdempotentUpload) -> Result<bool, StorageError> {
        let json = serde_json::to_string(upload).expect("an upload always serializes");
        self.set_while_held(key, token, "upload", s(json), "recording an idempotent upload").await
    }

    async fn renew(&self, key: &str, token: &str, lease_until: DateTime<Utc>) -> Result<bool, StorageError> {
        let until = n(lease_until.timestamp_millis());
        self.set_while_held(key, token, "lease_until", until, "renewing an idempotency key's claim").await
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StorageError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.idem_table)
            .key("key", s(key))
            .condition_expression("#t = :t AND attribute_not_exists(#u)")
            .expression_attribute_names("#u", "upload")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":t", s(token))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "ConditionalCheckFailedException") => Ok(()),
            Err(e) => Err(classify("releasing an idempotency key", e)),
        }
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.describe(&self.idem_table).await
    }
}

impl DynamoStore {
    /// Sets one attribute of a claim, only while `token` holds it and its upload is not
    /// recorded yet; false when it is not so held.
    async fn set_while_held(
        &self,
        key: &str,
        token: &str,
        name: &str,
        value: AttributeValue,
        what: &str,
    ) -> Result<bool, StorageError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.idem_table)
            .key("key", s(key))
            .update_expression("SET #a = :a")
            .condition_expression("#t = :t AND attribute_not_exists(#u)")
            .expression_attribute_names("#a", name)
            .expression_attribute_names("#u", "upload")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":a", value)
            .expression_attribute_values(":t", s(token))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, "ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(classify(what, e)),
        }
    }
}
