//! Reading AMQP headers, written once: the values RabbitMQ and txpipe put there come as
//! several AMQP types (long or short strings, signed or unsigned integers, timestamps), and
//! every reader wants them as text or a number.

use lapin::types::{AMQPValue, FieldTable};

/// A read-only view of a message's headers (possibly none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Headers<'a>(Option<&'a FieldTable>);

impl<'a> Headers<'a> {
    pub fn new(table: Option<&'a FieldTable>) -> Self {
        Self(table)
    }

    /// The headers of a delivered message.
    pub fn of(delivery: &'a lapin::message::Delivery) -> Self {
        Self(delivery.properties.headers().as_ref())
    }

    fn get(&self, name: &str) -> Option<&'a AMQPValue> {
        self.0?.inner().get(name)
    }

    /// A header as text: strings as they are, numbers in decimal, timestamps in RFC 3339.
    pub fn text(&self, name: &str) -> Option<String> {
        self.get(name).and_then(text)
    }

    /// A header as a non-negative whole number: an AMQP integer, or its decimal text (how
    /// txpipe writes its own headers, `x-txpipe-crashes` among them).
    pub fn u64(&self, name: &str) -> Option<u64> {
        match self.get(name)? {
            AMQPValue::LongString(s) => s.to_string().trim().parse().ok(),
            AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
            AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongUInt(v) => Some((*v).into()),
            AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
            AMQPValue::ShortUInt(v) => Some((*v).into()),
            AMQPValue::Timestamp(v) => Some(*v),
            _ => None,
        }
    }

    /// The first (most recent) entry of RabbitMQ's `x-death` list: where and why it was last
    /// dead-lettered by the broker.
    pub fn last_death(&self) -> Option<Headers<'a>> {
        match self.get("x-death")? {
            AMQPValue::FieldArray(a) => match a.as_slice().first()? {
                AMQPValue::FieldTable(t) => Some(Headers(Some(t))),
                _ => None,
            },
            _ => None,
        }
    }

    /// Every header that reads as text, by name.
    pub fn texts(&self) -> impl Iterator<Item = (String, String)> + 'a {
        self.0.into_iter().flat_map(|t| t.inner().iter()).filter_map(|(k, v)| Some((k.to_string(), text(v)?)))
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::Timestamp(t) => {
            Some(chrono::DateTime::from_timestamp(*t as i64, 0).map(|d| d.to_rfc3339()).unwrap_or_default())
        }
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_text_and_numbers() {
        let mut t = FieldTable::default();
        t.insert("s".into(), AMQPValue::LongString("v".into()));
        t.insert("n".into(), AMQPValue::LongLongInt(3));
        t.insert("neg".into(), AMQPValue::LongInt(-1));
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString("ns.validator".into()));
        t.insert("x-death".into(), AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()));
        let h = Headers::new(Some(&t));
        assert_eq!(h.text("s").as_deref(), Some("v"));
        assert_eq!(h.u64("n"), Some(3));
        assert_eq!(h.u64("neg"), None);
        assert_eq!(h.u64("s"), None, "text that is not a number");
        let mut counted = FieldTable::default();
        counted.insert("x-txpipe-crashes".into(), AMQPValue::LongString("2".into()));
        assert_eq!(Headers::new(Some(&counted)).u64("x-txpipe-crashes"), Some(2), "a count txpipe wrote as text");
        assert_eq!(h.text("n").as_deref(), Some("3"));
        assert_eq!(h.last_death().and_then(|d| d.text("queue")).as_deref(), Some("ns.validator"));
        assert_eq!(Headers::default().text("s"), None);
        assert_eq!(h.texts().count(), 3);
    }
}
