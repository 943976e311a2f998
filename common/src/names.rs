//! The names of every exchange, queue, table, bucket and object, derived from one namespace.
//!
//! These names are an interface: users bind their own queues to the notifications exchange
//! and point their tools at the tables, so they follow DESIGN.md exactly.

use crate::file_id::FileId;
use crate::stage::Stage;

/// All resource names for one namespace (`txpipe` by default; tests use a fresh one each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

/// Why a namespace was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid namespace {0:?}: use 1 to 50 characters of lower-case letters, digits and '-', starting with a letter or digit (it becomes part of bucket and table names)")]
pub struct InvalidNamespace(pub String);

impl Names {
    /// Builds the names for `ns`, which must be usable inside an S3 bucket name.
    pub fn new(ns: &str) -> Result<Self, InvalidNamespace> {
        let ok = !ns.is_empty()
            && ns.len() <= 50
            && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if ok {
            Ok(Self { ns: ns.to_owned() })
        } else {
            Err(InvalidNamespace(ns.to_owned()))
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// `{ns}.pipeline`: the topic exchange that carries stage messages.
    pub fn pipeline_exchange(&self) -> String {
        format!("{}.pipeline", self.ns)
    }

    /// `{ns}.notifications`: the topic exchange subscribers bind their queues to.
    pub fn notifications_exchange(&self) -> String {
        format!("{}.notifications", self.ns)
    }

    /// `{ns}.dlx`: the dead-letter exchange.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.ns)
    }

    /// `{ns}.dlq`: the queue that holds everything dead-lettered.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.ns)
    }

    /// The input queue of a stage: `{ns}.validator`, `{ns}.transformer`, `{ns}.notifier`.
    pub fn queue(&self, stage: Stage) -> String {
        format!("{}.{}", self.ns, stage.as_str())
    }

    /// The stage whose input queue is `queue`, if it is one of this namespace's.
    pub fn stage_of_queue(&self, queue: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| self.queue(*s) == queue)
    }

    /// `{ns}-transactions`, keyed by transaction_id.
    pub fn transactions_table(&self) -> String {
        format!("{}-transactions", self.ns)
    }

    /// `{ns}-transaction-versions`: every version of a transaction, keyed by the file that
    /// wrote it and transaction_id.
    pub fn transaction_versions_table(&self) -> String {
        format!("{}-transaction-versions", self.ns)
    }

    /// `{ns}-transaction-earlier-versions` (embedded store only): the versions a later one
    /// replaced, keyed by the file that wrote them and transaction_id. There
    /// `{ns}-transaction-versions` is a view of these and the current rows.
    pub fn transaction_earlier_versions_table(&self) -> String {
        format!("{}-transaction-earlier-versions", self.ns)
    }

    /// `{ns}-processing-status`, keyed by file_id.
    pub fn status_table(&self) -> String {
        format!("{}-processing-status", self.ns)
    }

    /// `{ns}-csv-files`.
    pub fn bucket(&self) -> String {
        format!("{}-csv-files", self.ns)
    }

    /// `{ns}-api-keys`: API keys (stored as hashes) and their daily upload counts.
    pub fn api_keys_table(&self) -> String {
        format!("{}-api-keys", self.ns)
    }

    /// `{ns}-idempotency-keys`: the uploads' `Idempotency-Key`s, by API key name and the key's
    /// SHA-256, each kept 24 hours.
    pub fn idempotency_table(&self) -> String {
        format!("{}-idempotency-keys", self.ns)
    }

    /// The prefix of the gateways' own event queues (`{ns}.gateway.{random}`): each replica's
    /// exclusive, auto-deleted queue of the events an upload waiting for its verdict wakes on.
    pub fn gateway_queue_prefix(&self) -> String {
        format!("{}.gateway.", self.ns)
    }

    /// `uploads/{file_id}.csv`.
    pub fn object_key(&self, file_id: &FileId) -> String {
        format!("uploads/{file_id}.csv")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let n = Names::new("txpipe").unwrap();
        assert_eq!(n.pipeline_exchange(), "txpipe.pipeline");
        assert_eq!(n.notifications_exchange(), "txpipe.notifications");
        assert_eq!(n.dead_letter_exchange(), "txpipe.dlx");
        assert_eq!(n.dead_letter_queue(), "txpipe.dlq");
        assert_eq!(n.queue(Stage::Validator), "txpipe.validator");
        assert_eq!(n.queue(Stage::Transformer), "txpipe.transformer");
        assert_eq!(n.queue(Stage::Notifier), "txpipe.notifier");
        assert_eq!(n.transactions_table(), "txpipe-transactions");
        assert_eq!(n.status_table(), "txpipe-processing-status");
        assert_eq!(n.bucket(), "txpipe-csv-files");
        assert_eq!(n.api_keys_table(), "txpipe-api-keys");
        assert_eq!(n.idempotency_table(), "txpipe-idempotency-keys");
        assert_eq!(n.gateway_queue_prefix(), "txpipe.gateway.");
        assert_eq!(n.stage_of_queue("txpipe.notifier"), Some(Stage::Notifier));
        assert_eq!(n.stage_of_queue("other.notifier"), None);
    }

    #[test]
    fn bad_namespaces_are_refused() {
        for bad in ["", "Upper", "a.b", "-x", "x-", "a b", &"x".repeat(51)] {
            assert!(Names::new(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Names::new("t-1a2b").is_ok());
    }
}
