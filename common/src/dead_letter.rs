//! What txpipe writes on a message it dead-letters, as one type: the worker loop encodes it
//! into the copy's `x-txpipe-*` headers, and `txpipe dlq` decodes it from them (or, for a
//! message RabbitMQ dead-lettered itself, from its `x-death` headers).

use crate::headers::Headers;
use crate::stage::Stage;
use chrono::{DateTime, Utc};

/// Why a message is dead-lettered, recorded in its `x-txpipe-error-class` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The body is not a message txpipe understands.
    Malformed,
    /// Processing can never succeed (e.g. the object is gone).
    Permanent,
    /// A transient fault outlasted every retry.
    RetriesExhausted,
    /// Its worker crashed on it `TXPIPE_DELIVERY_LIMIT` times (counted by txpipe, so alike on
    /// every RabbitMQ version; the same name RabbitMQ gives its own delivery-limit dead letters).
    DeliveryLimit,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 4] =
        [ErrorClass::Malformed, ErrorClass::Permanent, ErrorClass::RetriesExhausted, ErrorClass::DeliveryLimit];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Malformed => "malformed",
            ErrorClass::Permanent => "permanent",
            ErrorClass::RetriesExhausted => "retries_exhausted",
            ErrorClass::DeliveryLimit => "delivery_limit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// The headers txpipe puts on a dead-lettered copy.
pub mod header {
    pub const STAGE: &str = "x-txpipe-stage";
    pub const ERROR_CLASS: &str = "x-txpipe-error-class";
    pub const REASON: &str = "x-txpipe-reason";
    pub const ORIGINAL_EXCHANGE: &str = "x-txpipe-original-exchange";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-txpipe-original-routing-key";
    pub const DEAD_LETTERED_AT: &str = "x-txpipe-dead-lettered-at";
    /// On a message the worker gave back after a caught crash: crashes so far (for messages
    /// that move no file, whose count cannot live in a status record).
    pub const CRASHES: &str = "x-txpipe-crashes";
    /// On a stage message the stuck-file sweep published to resume a file in its working status.
    pub const RESUMED: &str = "x-txpipe-resumed";
    /// Every header of txpipe's dead-letter bookkeeping starts with this.
    pub const PREFIX: &str = "x-txpipe-";
}

/// The longest reason kept in a header (a reason can quote a whole storage error).
const MAX_REASON_CHARS: usize = 1000;

/// Why and from where txpipe dead-lettered a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterInfo {
    pub stage: Stage,
    pub class: ErrorClass,
    pub reason: String,
    /// Where a replay sends it.
    pub original_exchange: String,
    pub original_routing_key: String,
    pub dead_lettered_at: DateTime<Utc>,
}

impl DeadLetterInfo {
    /// The headers for the dead-lettered copy.
    pub fn encode(&self) -> Vec<(String, String)> {
        vec![
            (header::STAGE.into(), self.stage.as_str().into()),
            (header::ERROR_CLASS.into(), self.class.as_str().into()),
            (header::REASON.into(), self.reason.chars().take(MAX_REASON_CHARS).collect()),
            (header::ORIGINAL_EXCHANGE.into(), self.original_exchange.clone()),
            (header::ORIGINAL_ROUTING_KEY.into(), self.original_routing_key.clone()),
            (header::DEAD_LETTERED_AT.into(), self.dead_lettered_at.to_rfc3339()),
        ]
    }

    /// Reads them back; None for a message txpipe did not dead-letter itself.
    pub fn decode(headers: &Headers<'_>) -> Option<Self> {
        Some(Self {
            stage: Stage::parse(&headers.text(header::STAGE)?)?,
            class: ErrorClass::parse(&headers.text(header::ERROR_CLASS)?)?,
            reason: headers.text(header::REASON).unwrap_or_default(),
            original_exchange: headers.text(header::ORIGINAL_EXCHANGE)?,
            original_routing_key: headers.text(header::ORIGINAL_ROUTING_KEY)?,
            dead_lettered_at: headers
                .text(header::DEAD_LETTERED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default(),
        })
    }

    /// True for a header that belongs to dead-letter bookkeeping (txpipe's or RabbitMQ's), which
    /// a replay drops. `x-delivery-count` goes too: the replayed copy starts its count afresh.
    pub fn is_bookkeeping(name: &str) -> bool {
        name.starts_with(header::PREFIX)
            || name.starts_with("x-death")
            || name.starts_with("x-first-death")
            || name.starts_with("x-last-death")
            || name == "x-delivery-count"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};

    #[test]
    fn headers_round_trip() {
        let info = DeadLetterInfo {
            stage: Stage::Transformer,
            class: ErrorClass::RetriesExhausted,
            reason: "x".repeat(2000),
            original_exchange: "ns.pipeline".into(),
            original_routing_key: "file.validated".into(),
            dead_lettered_at: DateTime::parse_from_rfc3339("2024-01-15T10:30:00Z").unwrap().with_timezone(&Utc),
        };
        let mut table = FieldTable::default();
        for (k, v) in info.encode() {
            assert!(DeadLetterInfo::is_bookkeeping(&k));
            table.insert(k.as_str().into(), AMQPValue::LongString(v.into()));
        }
        let back = DeadLetterInfo::decode(&Headers::new(Some(&table))).unwrap();
        assert_eq!(back.reason.len(), MAX_REASON_CHARS);
        assert_eq!(DeadLetterInfo { reason: info.reason[..MAX_REASON_CHARS].into(), ..info }, back);
        assert_eq!(DeadLetterInfo::decode(&Headers::default()), None);
        assert!(!DeadLetterInfo::is_bookkeeping("traceparent"));
    }
}
